using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Qmp.Commands;

/// <summary>blockdev-add, blockdev-del, block_resize, query-named-block-nodes, query-block.</summary>
public sealed class BlockCoreCommands(BlockGraph graph) : ICommandModule
{
    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("blockdev-add", async (args, _, ct) =>
        {
            await graph.AddAsync(BlockOptionsBinder.Bind(args), ct).ConfigureAwait(false);
            return null;
        });
        table.Add("blockdev-del", async (args, _, _) =>
        {
            await graph.RemoveAsync(args["node-name"]!.GetValue<string>()).ConfigureAwait(false);
            return null;
        });
        table.Add("block_resize", async (args, _, ct) =>
        {
            await NodeResize.ResizeAsync(graph, args["device"]?.GetValue<string>(), args["node-name"]?.GetValue<string>(),
                args["size"]!.GetValue<long>(), ct).ConfigureAwait(false);
            return null;
        });
        table.Add("query-named-block-nodes", (args, _, _) =>
        {
            var flat = args["flat"]?.GetValue<bool>() ?? false;
            var list = new JsonArray();
            foreach (var n in graph.Nodes)
            {
                if (DescribeIfOpen(n, flat) is { } info)
                {
                    list.Add((JsonNode)info);
                }
            }
            return ValueTask.FromResult<JsonNode?>(list);
        });
        table.Add("query-block", (_, _, _) => ValueTask.FromResult<JsonNode?>(new JsonArray(
            graph.RootNodes.Select(n => (JsonNode)new JsonObject
            {
                ["device"] = n.NodeName,
                ["locked"] = false,
                ["removable"] = false,
                ["inserted"] = NodeInfo.Describe(n, flat: false),
                ["type"] = "unknown",
            }).ToArray())));
    }

    /// <summary>
    /// A node's info, or null when it left the graph and closed after the node list was taken (a job's
    /// drive-backup target is released in the background once the job ends): such a node is gone.
    /// </summary>
    private JsonObject? DescribeIfOpen(BlockNode node, bool flat)
    {
        try
        {
            return NodeInfo.Describe(node, flat);
        }
        catch (ObjectDisposedException) when (!ReferenceEquals(graph.Find(node.NodeName), node))
        {
            return null;
        }
    }
}
