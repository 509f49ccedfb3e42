using System.Text.Json.Nodes;

namespace Backup.Qmp.Commands;

/// <summary>
/// Runs one command. <paramref name="arguments"/> has already been checked against the schema and
/// holds typed values, so handlers read them without re-checking types. The result is the
/// <c>return</c> value; null means <c>{}</c>.
/// </summary>
public delegate ValueTask<JsonNode?> CommandHandler(JsonObject arguments, CommandContext context, CancellationToken cancellationToken);

/// <summary>What a handler knows about the request beyond its arguments.</summary>
public sealed class CommandContext(Session.QmpSession? session)
{
    private List<Action>? _afterReply;
    private SemaphoreSlim? _commandLock;

    /// <summary>The session the command came from; null for commands run by the daemon itself.</summary>
    public Session.QmpSession? Session { get; } = session;

    /// <summary>Runs <paramref name="action"/> once the reply has been queued for the client (quit uses it).</summary>
    public void AfterReply(Action action) => (_afterReply ??= []).Add(action);

    /// <summary>
    /// Lets the rest of the handler run without the QMP command lock, so that other commands go on
    /// meanwhile. Call it only after every look-up and check that must be atomic with other commands,
    /// holding what was looked up (e.g. <c>BlockNode.AddUser</c>) so that it stays valid. Idempotent.
    /// </summary>
    public void LeaveCommandLock() => Interlocked.Exchange(ref _commandLock, null)?.Release();

    /// <summary>The dispatcher hands the lock it took for this command; <see cref="LeaveCommandLock"/> releases it once.</summary>
    internal void HoldCommandLock(SemaphoreSlim commandLock) => _commandLock = commandLock;

    internal void RunAfterReply()
    {
        foreach (var a in _afterReply ?? [])
        {
            a();
        }
    }
}

/// <summary>A group of handlers for one schema module; each registers its commands by their wire names.</summary>
public interface ICommandModule
{
    void Register(CommandTable table);
}

/// <summary>Command name → handler. Every schema command must have exactly one (checked at start-up and by tests).</summary>
public sealed class CommandTable
{
    private readonly Dictionary<string, CommandHandler> _handlers = new(StringComparer.Ordinal);

    public void Add(string name, CommandHandler handler)
    {
        if (!_handlers.TryAdd(name, handler))
        {
            throw new InvalidOperationException($"command '{name}' registered twice");
        }
    }

    public bool TryGet(string name, out CommandHandler handler) => _handlers.TryGetValue(name, out handler!);

    public IReadOnlyCollection<string> Names => _handlers.Keys;
}
