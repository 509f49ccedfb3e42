using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Qmp.Commands;

namespace Backup.Qmp.Transactions;

/// <summary>
/// transaction: every action is prepared before any is committed; if one fails to prepare, the ones
/// prepared are aborted and nothing is visible afterwards. Commands run one at a time, so a
/// transaction is atomic with respect to every other command too.
/// </summary>
public sealed class TransactionCommands(IEnumerable<ITransactionActionModule> modules, BlockGraph graph) : ICommandModule
{
    private readonly TransactionActionTable _table = Build(modules);

    private static TransactionActionTable Build(IEnumerable<ITransactionActionModule> modules)
    {
        var t = new TransactionActionTable();
        t.Add("abort", (_, _) => new AbortAction());
        foreach (var m in modules)
        {
            m.Register(t);
        }
        return t;
    }

    public IReadOnlyCollection<string> ActionTypes => _table.Types;

    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("transaction", async (args, _, ct) =>
        {
            var context = new TransactionContext(args["properties"]?["completion-mode"]?.GetValue<string>() ?? "individual");
            var actions = new List<ITransactionAction>();
            foreach (var item in args["actions"]!.AsArray())
            {
                var type = item!["type"]!.GetValue<string>();
                if (!_table.TryGet(type, out var factory))
                {
                    throw new InvalidOperationException($"transaction action '{type}' is in the schema but has no implementation");
                }
                actions.Add(factory(item["data"]!.AsObject(), context));
            }
            // One instant for every action: no guest write may land between their points in time.
            var held = new List<IDisposable>();
            try
            {
                foreach (var node in NodesOf(args))
                {
                    held.Add(await node.QuiesceAsync(ct).ConfigureAwait(false));
                }
                await Transaction.RunAsync(actions, ct).ConfigureAwait(false);
            }
            finally
            {
                held.ForEach(h => h.Dispose());
            }
            return null;
        });
    }

    /// <summary>
    /// The nodes the actions name as their device or node, exported or not. Nodes a running job writes
    /// to (its targets) are left out: guests do not write to them, and holding one could hold a
    /// copy-before-write that a source's drain waits for.
    /// </summary>
    private IEnumerable<BlockNode> NodesOf(JsonObject args)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var item in args["actions"]!.AsArray())
        {
            var data = item!["data"] as JsonObject;
            foreach (var key in new[] { "device", "node" })
            {
                if (data?[key]?.GetValue<string>() is { } name && names.Add(name) &&
                    graph.Find(name) is { IsJobTarget: false } node)
                {
                    yield return node;
                }
            }
        }
    }

    /// <summary>Always fails: lets a client test that a transaction rolls back.</summary>
    private sealed class AbortAction : ITransactionAction
    {
        public ValueTask PrepareAsync(CancellationToken cancellationToken) =>
            throw new BlockException("Transaction aborted using Abort action");

        public void Commit() { }

        public void Abort() { }

        public void Clean() { }
    }
}
