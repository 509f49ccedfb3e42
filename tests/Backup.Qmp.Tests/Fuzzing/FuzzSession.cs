using System.Net.Sockets;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Qmp.Commands;
using Backup.Qmp.Schema;
using Backup.Qmp.Session;
using Microsoft.Extensions.Logging.Abstractions;

namespace Backup.Qmp.Tests.Fuzzing;

/// <summary>
/// A real <see cref="QmpSession"/> (framer, parser, request checks, schema validation, dispatch) on one
/// end of a Unix socket pair, with a small schema: <c>t</c> takes every kind of argument and echoes the
/// validated ones, <c>boom</c> fails with .NET text that must never reach the client.
/// </summary>
internal sealed class FuzzSession : IAsyncDisposable
{
    public const string SecretText = "SECRET .NET exception text";

    private static readonly SchemaModel Schema = SchemaLoader.Load([("fuzz.json", """
        {
          "module": "fuzz", "doc": "fuzz",
          "definitions": [
            { "enum": "Mode", "doc": "m", "data": ["on-success", "never"] },
            { "struct": "Inner", "doc": "i", "data": { "name": "str", "*size": "int" } },
            { "command": "qmp_capabilities", "doc": "c", "data": { "*enable": ["str"] } },
            { "command": "query-version", "doc": "v" },
            { "command": "boom", "doc": "b" },
            { "command": "t", "doc": "t",
              "data": { "node": "str", "*gran": "uint32", "*big": "uint64", "*speed": "int", "*flag": "bool",
                        "*mode": "Mode", "*inner": "Inner", "*list": ["Inner"] } }
          ]
        }
        """)]);

    private readonly QmpDispatcher _dispatcher = new(Schema, [new FuzzCommands()]);
    private readonly CancellationTokenSource _stop = new();
    private readonly List<(Socket Server, Task Run)> _sessions = [];

    /// <summary>Opens a new session and returns the client's end, already past the greeting and negotiated.</summary>
    public async Task<QmpLineClient> ConnectAsync()
    {
        var (server, client) = await SocketPair.CreateAsync().ConfigureAwait(false);
        var stream = new NetworkStream(server, ownsSocket: true);
        var session = new QmpSession(stream, _dispatcher, NullLogger.Instance, "fuzz");
        var run = Task.Run(async () =>
        {
            using (session)
            {
                await session.RunAsync(new JsonObject { ["QMP"] = new JsonObject() }, _stop.Token).ConfigureAwait(false);
            }
            await stream.DisposeAsync().ConfigureAwait(false);
        });
        _sessions.Add((server, run));
        var c = new QmpLineClient(client);
        await c.ReadLineAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        await c.SendAsync("{\"execute\":\"qmp_capabilities\"}\n"u8.ToArray()).ConfigureAwait(false);
        await c.ReadLineAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        return c;
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        await Task.WhenAll(_sessions.Select(s => s.Run)).WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        _stop.Dispose();
        _dispatcher.Dispose();
    }

    private sealed class FuzzCommands : ICommandModule
    {
        public void Register(CommandTable table)
        {
            table.Add("qmp_capabilities", (_, ctx, _) =>
            {
                ctx.Session?.CompleteNegotiation(false);
                return ValueTask.FromResult<JsonNode?>(null);
            });
            table.Add("query-version", (_, _, _) => ValueTask.FromResult<JsonNode?>(new JsonObject { ["v"] = 1 }));
            table.Add("boom", (_, _, _) => throw new InvalidOperationException(SecretText));
            table.Add("t", (args, _, _) => ValueTask.FromResult<JsonNode?>(args.DeepClone()));
        }
    }
}

/// <summary>Two connected Unix stream sockets (there is no socketpair in .NET): a listener in /tmp for a moment.</summary>
internal static class SocketPair
{
    public static async Task<(Socket Server, Socket Client)> CreateAsync()
    {
        var path = Path.Combine("/tmp", "hostile-sp-" + Guid.NewGuid().ToString("N")[..12] + ".sock");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        try
        {
            var client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            var accept = listener.AcceptAsync();
            await client.ConnectAsync(new UnixDomainSocketEndPoint(path)).ConfigureAwait(false);
            return (await accept.ConfigureAwait(false), client);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
