using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Qmp.Commands;
using Backup.Qmp.Schema;

namespace Backup.Qmp;

/// <summary>
/// Validates and runs commands. Commands from every session run one at a time (like QEMU's main loop
/// under its big lock), which makes each command atomic with respect to all others; I/O does not
/// take this lock. A handler may leave the lock early (<see cref="CommandContext.LeaveCommandLock"/>)
/// once its atomic part is done.
/// </summary>
public sealed class QmpDispatcher : IDisposable
{
    private readonly CommandTable _table = new();
    private readonly SemaphoreSlim _commandLock = new(1, 1);

    public QmpDispatcher(SchemaModel schema, IEnumerable<ICommandModule> modules)
    {
        ArgumentNullException.ThrowIfNull(schema);
        ArgumentNullException.ThrowIfNull(modules);
        Schema = schema;
        foreach (var m in modules)
        {
            m.Register(_table);
        }
        var unhandled = schema.Commands.Keys.Except(_table.Names).ToList();
        var undeclared = _table.Names.Except(schema.Commands.Keys).ToList();
        if (unhandled.Count > 0 || undeclared.Count > 0)
        {
            throw new InvalidOperationException(
                $"schema and handlers disagree: no handler for [{string.Join(", ", unhandled)}], not in schema: [{string.Join(", ", undeclared)}]");
        }
    }

    public SchemaModel Schema { get; }

    public void Dispose() => _commandLock.Dispose();

    /// <summary>Runs a command by name with raw (unchecked) arguments; errors come back as <see cref="BlockException"/>.</summary>
    public async ValueTask<JsonNode?> ExecuteAsync(string name, JsonObject? arguments, CommandContext context, CancellationToken cancellationToken)
    {
        if (!Schema.Commands.TryGetValue(name, out var def) || !_table.TryGet(name, out var handler))
        {
            throw new BlockException($"The command {name} has not been found", ErrorClass.CommandNotFound);
        }
        var args = InputValidator.ValidateArguments(arguments, def.Arguments);
        ArgumentNullException.ThrowIfNull(context);
        await _commandLock.WaitAsync(cancellationToken).ConfigureAwait(false);
        context.HoldCommandLock(_commandLock);
        try
        {
            return await handler(args, context, cancellationToken).ConfigureAwait(false) ?? new JsonObject();
        }
        finally
        {
            context.LeaveCommandLock();
        }
    }
}
