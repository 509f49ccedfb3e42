using System.Text.Json.Nodes;
using Backup.Qmp.Schema;

namespace Backup.Qmp.Commands;

/// <summary>qmp_capabilities, query-version, query-commands, query-qmp-schema, quit.</summary>
public sealed class ControlCommands(SchemaModel schema, VersionInfo version, IShutdownRequester shutdown) : ICommandModule
{
    private readonly Lazy<JsonArray> _introspection = new(() => SchemaIntrospection.Build(schema));

    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("qmp_capabilities", (args, ctx, _) =>
        {
            var oob = args["enable"]?.AsArray().Any(c => c!.GetValue<string>() == "oob") ?? false;
            ctx.Session?.CompleteNegotiation(oob);
            return ValueTask.FromResult<JsonNode?>(null);
        });
        table.Add("query-version", (_, _, _) => ValueTask.FromResult<JsonNode?>(version.ToJson()));
        table.Add("query-commands", (_, _, _) => ValueTask.FromResult<JsonNode?>(new JsonArray(
            schema.Commands.Keys.Order(StringComparer.Ordinal).Select(n => (JsonNode)new JsonObject { ["name"] = n }).ToArray())));
        table.Add("query-qmp-schema", (_, _, _) => ValueTask.FromResult<JsonNode?>(_introspection.Value.DeepClone()));
        table.Add("quit", async (_, ctx, ct) =>
        {
            // QSD's client sees each export's BLOCK_EXPORT_DELETED before the quit reply; then the reply
            // is queued, then shutdown starts.
            await shutdown.BeforeQuitReplyAsync(ct).ConfigureAwait(false);
            ctx.AfterReply(() => shutdown.RequestShutdown("host-qmp-quit"));
            return null;
        });
    }
}

/// <summary>How a command asks the daemon to stop (the host decides how).</summary>
public interface IShutdownRequester
{
    void RequestShutdown(string reason);

    /// <summary>
    /// What QSD has done by the time its quit reply reaches the client: every export closed, each with
    /// its BLOCK_EXPORT_DELETED event.
    /// </summary>
    ValueTask BeforeQuitReplyAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;
}
