using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using System.Threading.Channels;

namespace Backup.IntegrationTests.Support;

/// <summary>A minimal QMP client for tests: replies in order, events collected separately.</summary>
public sealed class QmpClient : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly StreamReader _reader;
    private readonly Channel<JsonObject> _replies = Channel.CreateUnbounded<JsonObject>();
    private readonly Channel<JsonObject> _events = Channel.CreateUnbounded<JsonObject>();
    private readonly Task _readLoop;

    private QmpClient(Socket socket)
    {
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: true);
        _reader = new StreamReader(_stream, Encoding.UTF8);
        _readLoop = Task.Run(ReadLoopAsync);
    }

    public JsonObject Greeting { get; private set; } = [];

    public static async Task<QmpClient> ConnectAsync(string path, bool negotiate = true)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await s.ConnectAsync(new UnixDomainSocketEndPoint(path));
        var c = new QmpClient(s);
        c.Greeting = await c.NextReplyAsync();
        if (negotiate)
        {
            (await c.ExecuteAsync("qmp_capabilities")).Should().ContainKey("return");
        }
        return c;
    }

    private async Task ReadLoopAsync()
    {
        try
        {
            while (await _reader.ReadLineAsync() is { } line)
            {
                var msg = JsonNode.Parse(line)!.AsObject();
                await (msg.ContainsKey("event") ? _events : _replies).Writer.WriteAsync(msg);
            }
        }
        catch (IOException)
        {
        }
        catch (ObjectDisposedException)
        {
        }
        _replies.Writer.TryComplete();
        _events.Writer.TryComplete();
    }

    public async Task<JsonObject> NextReplyAsync(TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(30));
        return await _replies.Reader.ReadAsync(cts.Token);
    }

    public async Task<JsonObject> NextEventAsync(TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(30));
        return await _events.Reader.ReadAsync(cts.Token);
    }

    /// <summary>True when the daemon has closed the connection (no more replies will come).</summary>
    public async Task<bool> IsClosedAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            return !await _replies.Reader.WaitToReadAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    public async Task SendRawAsync(string text)
    {
        var bytes = Encoding.UTF8.GetBytes(text);
        await _stream.WriteAsync(bytes);
    }

    public async Task<JsonObject> ExecuteAsync(string command, object? arguments = null, JsonNode? id = null)
    {
        var msg = new JsonObject { ["execute"] = command };
        if (arguments is not null)
        {
            msg["arguments"] = arguments as JsonNode ?? JsonNode.Parse(System.Text.Json.JsonSerializer.Serialize(arguments));
        }
        if (id is not null)
        {
            msg["id"] = id;
        }
        await SendRawAsync(msg.ToJsonString() + "\n");
        return await NextReplyAsync();
    }

    public async ValueTask DisposeAsync()
    {
        _socket.Shutdown(SocketShutdown.Both);
        await _stream.DisposeAsync();
        await _readLoop;
        _reader.Dispose();
    }
}
