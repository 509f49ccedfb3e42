using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Bitmaps;

namespace Backup.Qmp.Commands;

/// <summary>block-dirty-bitmap-add/remove/clear/enable/disable/merge and x-debug-block-dirty-bitmap-sha256.</summary>
public sealed class BitmapCommands(BlockGraph graph) : ICommandModule
{
    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("block-dirty-bitmap-add", (args, _, _) =>
        {
            var name = args["name"]!.GetValue<string>();
            DirtyBitmapSet.CheckNameNotEmpty(name);
            var nodeName = args["node"]!.GetValue<string>();
            var node = graph.Find(nodeName) ?? throw new BlockException($"Cannot find device='{nodeName}' nor node-name='{nodeName}'");
            var granularity = args["granularity"]?.GetValue<long>();
            if (granularity is { } g)
            {
                DirtyBitmapSet.CheckGranularity(g);
            }
            var persistent = args["persistent"]?.GetValue<bool>() ?? false;
            if (persistent)
            {
                CheckCanStore(node, name);
            }
            node.GetDirtyBitmaps().Add(name, granularity, persistent,
                args["disabled"]?.GetValue<bool>() ?? false);
            return Done();
        });
        table.Add("block-dirty-bitmap-remove", (args, _, _) => { Set(args).Remove(Name(args)); return Done(); });
        table.Add("block-dirty-bitmap-clear", (args, _, _) => { Set(args).Clear(Name(args)); return Done(); });
        table.Add("block-dirty-bitmap-enable", (args, _, _) => { Set(args).Enable(Name(args)); return Done(); });
        table.Add("block-dirty-bitmap-disable", (args, _, _) => { Set(args).Disable(Name(args)); return Done(); });
        table.Add("x-debug-block-dirty-bitmap-sha256", (args, _, _) =>
            ValueTask.FromResult<JsonNode?>(new JsonObject { ["sha256"] = Set(args).Sha256(Name(args)) }));
        table.Add("block-dirty-bitmap-merge", (args, _, _) =>
        {
            var target = Set(args).Get(args["target"]!.GetValue<string>());
            var sources = new List<DirtyBitmap>();
            foreach (var s in args["bitmaps"]!.AsArray())
            {
                sources.Add(s is JsonObject external
                    ? Set(external).Get(Name(external))
                    : Set(args).Get(s!.GetValue<string>()));
            }
            DirtyBitmapSet.Merge(target, sources);
            return Done();
        });
    }

    /// <summary>
    /// QEMU asks the format whether it can store a new persistent bitmap before creating it: only
    /// qcow2 can (its bitmaps extension), and its names are limited to 1023 bytes. The bitmaps are
    /// written to the image by the persistence feature.
    /// </summary>
    private static void CheckCanStore(BlockNode node, string name)
    {
        if (node.DriverName != "qcow2")
        {
            throw new BlockException($"Can't store persistent bitmaps to {node.NodeName}: Operation not supported");
        }
        if (System.Text.Encoding.UTF8.GetByteCount(name) > DirtyBitmapSet.MaxNameBytes)
        {
            throw new BlockException($"Can't make bitmap '{name}' persistent in '{node.NodeName}': " +
                $"Name length exceeds maximum ({DirtyBitmapSet.MaxNameBytes} characters)");
        }
    }

    private static ValueTask<JsonNode?> Done() => ValueTask.FromResult<JsonNode?>(null);

    private static string Name(JsonObject args) => args["name"]!.GetValue<string>();

    /// <summary>The bitmaps of the node named by 'node'; these commands word an unknown node differently from add.</summary>
    private DirtyBitmapSet Set(JsonObject args)
    {
        var nodeName = args["node"]!.GetValue<string>();
        var node = graph.Find(nodeName) ?? throw new BlockException($"Node '{nodeName}' not found");
        return node.GetDirtyBitmaps();
    }

    /// <summary>The dirty-bitmaps member of a node's query entry; null when it has none (QSD omits the key).</summary>
    public static JsonArray? Describe(BlockNode node)
    {
        ArgumentNullException.ThrowIfNull(node);
        var set = node.TryGetDirtyBitmaps();
        if (set is null || set.IsEmpty)
        {
            return null;
        }
        var list = new JsonArray();
        foreach (var b in set.Query())
        {
            var o = new JsonObject();
            if (b.Name is not null)
            {
                o["name"] = b.Name;
            }
            o["recording"] = b.Recording;
            o["persistent"] = b.Persistent;
            o["busy"] = b.Busy;
            o["granularity"] = b.Granularity;
            o["count"] = b.Count;
            if (b.Inconsistent)
            {
                o["inconsistent"] = true;
            }
            list.Add(o);
        }
        return list;
    }
}
