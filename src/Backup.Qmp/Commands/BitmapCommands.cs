using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Bitmaps;

namespace Backup.Qmp.Commands;

/// <summary>
/// block-dirty-bitmap-add/remove/clear/enable/disable/merge and x-debug-block-dirty-bitmap-sha256.
/// Each changing command is the same action a transaction runs (see <see cref="BitmapActions"/>),
/// run as a transaction of one.
/// </summary>
public sealed class BitmapCommands(BlockGraph graph) : ICommandModule, Transactions.ITransactionActionModule
{
    private readonly BitmapActions _actions = new(graph);

    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        var individual = new Transactions.TransactionContext("individual");
        foreach (var type in BitmapActions.Types)
        {
            table.Add(type, async (args, _, ct) =>
            {
                await Transactions.Transaction.RunAsync(_actions.Create(type, args, individual), ct).ConfigureAwait(false);
                return null;
            });
        }
        table.Add("x-debug-block-dirty-bitmap-sha256", (args, _, _) =>
            ValueTask.FromResult<JsonNode?>(new JsonObject { ["sha256"] = _actions.Set(args).Sha256(args["name"]!.GetValue<string>()) }));
    }

    public void Register(Transactions.TransactionActionTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        foreach (var type in BitmapActions.Types)
        {
            table.Add(type, (data, context) => _actions.Create(type, data, context));
        }
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
            if (b.CrashConsistent)
            {
                o["crash-consistent"] = true;
            }
            list.Add((JsonNode)o);
        }
        return list;
    }
}
