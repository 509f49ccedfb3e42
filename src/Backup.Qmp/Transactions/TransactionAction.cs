using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Qmp.Transactions;

/// <summary>
/// One action of a transaction (QEMU's include/qemu/transactions.h): <see cref="PrepareAsync"/> does
/// everything that can fail and leaves it undoable; then either every prepared action is committed
/// (in order) or every prepared action is aborted (in reverse order); <see cref="Clean"/> runs last in
/// both cases. Standalone commands run the same action as a transaction of one.
/// </summary>
public interface ITransactionAction
{
    ValueTask PrepareAsync(CancellationToken cancellationToken);

    void Commit();

    void Abort();

    void Clean();
}

/// <summary>What every action of one transaction shares.</summary>
public sealed class TransactionContext(string completionMode)
{
    /// <summary>"individual" (default) or "grouped": jobs of a grouped transaction succeed or fail together.</summary>
    public string CompletionMode { get; } = completionMode;

    public bool Grouped => CompletionMode == "grouped";

    private readonly Dictionary<Type, object> _shared = [];

    /// <summary>One object of type <typeparamref name="T"/> shared by the actions of this transaction (e.g. a job group).</summary>
    public T Shared<T>(Func<T> create) where T : class
    {
        ArgumentNullException.ThrowIfNull(create);
        if (!_shared.TryGetValue(typeof(T), out var o))
        {
            o = create();
            _shared[typeof(T)] = o;
        }
        return (T)o;
    }

    /// <summary>Actions that are not jobs refuse grouped completion, with QEMU's words.</summary>
    public void RequireIndividual(string actionType)
    {
        if (Grouped)
        {
            throw new BlockException($"Action '{actionType}' does not support Transaction property completion-mode = grouped");
        }
    }
}

/// <summary>Makes an action from its validated <c>data</c>.</summary>
public delegate ITransactionAction TransactionActionFactory(JsonObject data, TransactionContext context);

/// <summary>Action type → factory; modules that own an action (bitmaps, backups) register it here.</summary>
public sealed class TransactionActionTable
{
    private readonly Dictionary<string, TransactionActionFactory> _factories = new(StringComparer.Ordinal);

    public void Add(string type, TransactionActionFactory factory)
    {
        if (!_factories.TryAdd(type, factory))
        {
            throw new InvalidOperationException($"transaction action '{type}' registered twice");
        }
    }

    public bool TryGet(string type, out TransactionActionFactory factory) => _factories.TryGetValue(type, out factory!);

    public IReadOnlyCollection<string> Types => _factories.Keys;
}

/// <summary>A module that contributes transaction actions.</summary>
public interface ITransactionActionModule
{
    void Register(TransactionActionTable table);
}

/// <summary>Runs actions all or nothing.</summary>
public static class Transaction
{
    public static async ValueTask RunAsync(IReadOnlyList<ITransactionAction> actions, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(actions);
        var prepared = new List<ITransactionAction>(actions.Count);
        try
        {
            foreach (var a in actions)
            {
                prepared.Add(a);
                await a.PrepareAsync(cancellationToken).ConfigureAwait(false);
            }
        }
        catch
        {
            for (var i = prepared.Count - 1; i >= 0; i--)
            {
                prepared[i].Abort();
            }
            foreach (var a in prepared)
            {
                a.Clean();
            }
            throw;
        }
        foreach (var a in actions)
        {
            a.Commit();
        }
        foreach (var a in actions)
        {
            a.Clean();
        }
    }

    /// <summary>A standalone command: the same action as a transaction of one.</summary>
    public static ValueTask RunAsync(ITransactionAction action, CancellationToken cancellationToken) =>
        RunAsync([action], cancellationToken);
}
