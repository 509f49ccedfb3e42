using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Nbd.Exports;
using Backup.Nbd.Server;
using Backup.Qmp.Commands;

namespace Backup.Nbd.Commands;

/// <summary>
/// nbd-server-start, nbd-server-stop, nbd-server-add, nbd-server-remove, block-export-add,
/// block-export-del, query-block-exports (schemas/nbd.json). Thin: they bind validated arguments and
/// call <see cref="NbdServer"/>, which holds the checks and QEMU's messages.
/// </summary>
public sealed class NbdCommands(NbdServer server) : ICommandModule
{
    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("nbd-server-start", (args, _, _) =>
        {
            server.Start(ParseLegacyAddress(args["addr"]!.AsObject()), MaxConnections(args), args["tls-creds"]?.GetValue<string>(),
                args["tls-authz"]?.GetValue<string>(), HandshakeMaxSeconds(args));
            return ValueTask.FromResult<JsonNode?>(null);
        });
        table.Add("nbd-server-stop", async (_, _, _) =>
        {
            if (!server.IsRunning)
            {
                throw new BlockException("NBD server not running");
            }
            await server.StopAsync().ConfigureAwait(false);
            return null;
        });
        table.Add("block-export-add", (args, _, _) =>
        {
            server.AddExport(ExportOptions(args), args["iothread"]?.GetValue<string>());
            return ValueTask.FromResult<JsonNode?>(null);
        });
        table.Add("nbd-server-add", (args, _, _) =>
        {
            var device = args["device"]!.GetValue<string>();
            var name = args["name"]?.GetValue<string>();
            var options = new NbdExportOptions
            {
                Id = name ?? device,
                NodeName = device,
                Name = name,
                Description = args["description"]?.GetValue<string>(),
                Writable = args["writable"]?.GetValue<bool>() ?? false,
                Bitmaps = args["bitmap"] is { } b ? [new ExportBitmapReference(null, b.GetValue<string>())] : [],
                LegacyDeviceLookup = true,
            };
            server.AddExport(options);
            return ValueTask.FromResult<JsonNode?>(null);
        });
        table.Add("block-export-del", async (args, _, _) =>
        {
            await server.RemoveExportAsync(args["id"]!.GetValue<string>(), IsHard(args)).ConfigureAwait(false);
            return null;
        });
        table.Add("nbd-server-remove", async (args, _, _) =>
        {
            await server.RemoveExportAsync(args["name"]!.GetValue<string>(), IsHard(args)).ConfigureAwait(false);
            return null;
        });
        table.Add("query-block-exports", (_, _, _) => ValueTask.FromResult<JsonNode?>(new JsonArray(
            server.Exports.Select(e => (JsonNode)new JsonObject
            {
                ["id"] = e.Id,
                ["type"] = "nbd",
                ["node-name"] = e.Node.NodeName,
                ["shutting-down"] = e.ShuttingDown,
            }).ToArray())));
    }

    /// <summary>The validated arguments of block-export-add (type nbd) as export options.</summary>
    public static NbdExportOptions ExportOptions(JsonObject args)
    {
        ArgumentNullException.ThrowIfNull(args);
        return new NbdExportOptions
        {
            Id = args["id"]!.GetValue<string>(),
            NodeName = args["node-name"]!.GetValue<string>(),
            Name = args["name"]?.GetValue<string>(),
            Description = args["description"]?.GetValue<string>(),
            Writable = args["writable"]?.GetValue<bool>() ?? false,
            Writethrough = args["writethrough"]?.GetValue<bool>() ?? false,
            AllocationDepth = args["allocation-depth"]?.GetValue<bool>() ?? false,
            Bitmaps = args["bitmaps"]?.AsArray().Select(b => b is JsonObject o
                ? new ExportBitmapReference(o["node"]!.GetValue<string>(), o["name"]!.GetValue<string>())
                : new ExportBitmapReference(null, b!.GetValue<string>())).ToList() ?? [],
        };
    }

    /// <summary>nbd-server-start's <c>addr</c> (SocketAddressLegacy: members under <c>data</c>).</summary>
    public static NbdServerAddress ParseLegacyAddress(JsonObject addr)
    {
        ArgumentNullException.ThrowIfNull(addr);
        return ParseAddress(addr["type"]!.GetValue<string>(), addr["data"]!.AsObject(), fromCommandLine: false);
    }

    /// <summary>--nbd-server's <c>addr</c> (SocketAddress: members inline).</summary>
    public static NbdServerAddress ParseFlatAddress(JsonObject addr)
    {
        ArgumentNullException.ThrowIfNull(addr);
        return ParseAddress(addr["type"]!.GetValue<string>(), addr, fromCommandLine: true);
    }

    /// <summary>Starts the server from NbdServerOptions (the validated --nbd-server option).</summary>
    public static void StartFromOptions(NbdServer server, JsonObject nbdServerOptions)
    {
        ArgumentNullException.ThrowIfNull(server);
        ArgumentNullException.ThrowIfNull(nbdServerOptions);
        server.Start(ParseFlatAddress(nbdServerOptions["addr"]!.AsObject()), MaxConnections(nbdServerOptions),
            nbdServerOptions["tls-creds"]?.GetValue<string>(), nbdServerOptions["tls-authz"]?.GetValue<string>(),
            HandshakeMaxSeconds(nbdServerOptions));
    }

    /// <summary>
    /// A descriptor number is honoured only on the command line, as in QSD: there it names an fd the
    /// parent passed; in a QMP command it would name a monitor fd (getfd), which QSD does not have.
    /// </summary>
    private static NbdServerAddress ParseAddress(string type, JsonObject data, bool fromCommandLine) => type switch
    {
        "unix" => new NbdUnixAddress(data["path"]!.GetValue<string>(), data["abstract"]?.GetValue<bool>() ?? false),
        "inet" => new NbdInetAddress(data["host"]!.GetValue<string>(), data["port"]!.GetValue<string>(),
            data["ipv4"]?.GetValue<bool>(), data["ipv6"]?.GetValue<bool>()),
        "vsock" => throw new BlockException("Failed to bind socket: Cannot assign requested address"),
        "fd" when fromCommandLine => new NbdFdAddress(data["str"]!.GetValue<string>()),
        _ => throw new BlockException("only QEMU supports file descriptor passing"),
    };

    private static uint MaxConnections(JsonObject args) => args["max-connections"] is { } m ? ToUInt32(m) : 0;

    private static uint HandshakeMaxSeconds(JsonObject args) =>
        args["handshake-max-seconds"] is { } h ? ToUInt32(h) : NbdServer.DefaultHandshakeMaxSeconds;

    private static uint ToUInt32(JsonNode node) =>
        node.AsValue().TryGetValue<uint>(out var u) ? u : (uint)node.GetValue<long>();

    private static bool IsHard(JsonObject args) => args["mode"]?.GetValue<string>() == "hard";
}
