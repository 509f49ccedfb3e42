using System.Buffers;
using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Threading.Channels;

namespace Backup.Qmp.Client;

/// <summary>
/// A QMP connection (docs/interop/qmp-spec.rst): the greeting, <c>qmp_capabilities</c>, commands that
/// carry an id and are matched to their replies by it, and events handed to listeners in arrival order.
/// Commands may be issued from several tasks at once; each message is written whole, one per line.
/// </summary>
public sealed class QmpClient : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly PipeReader _input;
    private readonly SemaphoreSlim _writeLock = new(1, 1);
    private readonly ConcurrentDictionary<long, Pending> _pending = new();
    private readonly Lock _listenersLock = new();
    private readonly TaskCompletionSource<JsonObject> _greeting = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private List<QmpEventListener> _listeners = [];
    private readonly QmpEventListener _events;
    private readonly CancellationTokenSource _closing = new();

    /// <summary>Replies no command of ours claims (answers to <see cref="SendRawAsync"/> input); the oldest go when it is full.</summary>
    private readonly Channel<JsonObject> _unclaimed = Channel.CreateBounded<JsonObject>(
        new BoundedChannelOptions(4096) { FullMode = BoundedChannelFullMode.DropOldest, SingleReader = true });
    private Task _readLoop = Task.CompletedTask;
    private long _nextId;
    private Exception? _closedBecause;

    private static readonly ReadOnlyMemory<byte> Newline = "\n"u8.ToArray();

    private sealed record Pending(string Command, TaskCompletionSource<JsonObject> Reply);

    private QmpClient(Socket socket)
    {
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: true);
        _input = PipeReader.Create(_stream, new StreamPipeReaderOptions(bufferSize: 64 * 1024, leaveOpen: true));
        _events = Listen();
    }

    /// <summary>The server's greeting (<c>{"QMP": {"version": ..., "capabilities": [...]}}</c>).</summary>
    public JsonObject Greeting { get; private set; } = [];

    /// <summary>Every event since the connection was made (the default listener).</summary>
    public QmpEventListener Events => _events;

    /// <summary>Lines the server sent that were not JSON (skipped); a healthy server sends none.</summary>
    public int GarbageLines { get; private set; }

    /// <summary>
    /// Connects, reads the greeting and, with <paramref name="negotiate"/>, leaves capabilities
    /// negotiation with <c>qmp_capabilities</c>. A server that sends no greeting within
    /// <paramref name="greetingTimeout"/> (10 s by default) is not taken for a QMP server.
    /// </summary>
    public static async Task<QmpClient> ConnectAsync(QmpAddress address, bool negotiate = true, TimeSpan? greetingTimeout = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(address);
        Socket socket;
        try
        {
            socket = await address.ConnectAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (SocketException e)
        {
            throw new QmpConnectionException($"cannot connect to {address}: {e.Message}", e);
        }
        var client = new QmpClient(socket);
        client._readLoop = Task.Run(client.ReadLoopAsync, CancellationToken.None);
        try
        {
            using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            cts.CancelAfter(greetingTimeout ?? TimeSpan.FromSeconds(10));
            try
            {
                client.Greeting = await client._greeting.Task.WaitAsync(cts.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
            {
                throw new QmpConnectionException($"{address} sent no QMP greeting");
            }
            if (negotiate)
            {
                await client.ExecuteAsync("qmp_capabilities", null, cancellationToken).ConfigureAwait(false);
            }
            return client;
        }
        catch
        {
            await client.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>A new listener that receives every event from now on.</summary>
    public QmpEventListener Listen()
    {
        var listener = new QmpEventListener(Detach);
        lock (_listenersLock)
        {
            if (_closedBecause is not null || _closing.IsCancellationRequested)
            {
                listener.Complete(null);
                return listener;
            }
            _listeners = [.. _listeners, listener];
        }
        return listener;
    }

    private void Detach(QmpEventListener listener)
    {
        lock (_listenersLock)
        {
            _listeners = _listeners.Where(l => l != listener).ToList();
        }
    }

    /// <summary>
    /// Runs a command and returns its <c>return</c> value. An error reply becomes a
    /// <see cref="QmpErrorException"/> with the server's class and description.
    /// </summary>
    public async Task<JsonNode?> ExecuteAsync(string command, JsonObject? arguments = null, CancellationToken cancellationToken = default)
    {
        var reply = await ExecuteRawAsync(command, arguments, cancellationToken).ConfigureAwait(false);
        if (reply["error"] is JsonObject error)
        {
            throw new QmpErrorException(command, error["class"]?.GetValue<string>() ?? "GenericError", error["desc"]?.GetValue<string>() ?? "");
        }
        return reply["return"];
    }

    /// <summary>Runs a command and returns the whole reply (with <c>return</c> or <c>error</c>); the id is ours.</summary>
    public async Task<JsonObject> ExecuteRawAsync(string command, JsonObject? arguments = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(command);
        var id = Interlocked.Increment(ref _nextId);
        var message = new JsonObject { ["execute"] = command };
        if (arguments is not null)
        {
            message["arguments"] = arguments.DeepClone();
        }
        message["id"] = id;
        var pending = new Pending(command, new TaskCompletionSource<JsonObject>(TaskCreationOptions.RunContinuationsAsynchronously));
        _pending[id] = pending;
        try
        {
            if (_closedBecause is { } closed)
            {
                throw new QmpConnectionException("the QMP connection is closed", closed);
            }
            await SendAsync(message, cancellationToken).ConfigureAwait(false);
            var reply = await pending.Reply.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
            reply.Remove("id");
            return reply;
        }
        finally
        {
            _pending.TryRemove(id, out _);
        }
    }

    /// <summary>
    /// The next reply that answers no command of this client: replies to input sent with
    /// <see cref="SendRawAsync"/> (with the id it carried, if any), and error replies to input the server
    /// could not read while no command was waiting. Throws <see cref="QmpConnectionException"/> once the
    /// connection has closed and every such reply was taken.
    /// </summary>
    public async Task<JsonObject> NextUnclaimedReplyAsync(CancellationToken cancellationToken = default)
    {
        try
        {
            return await _unclaimed.Reader.ReadAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (ChannelClosedException e)
        {
            throw new QmpConnectionException("the QMP connection closed", e);
        }
    }

    /// <summary>Sends bytes as they are (for tests of the server's framing); their replies are <see cref="NextUnclaimedReplyAsync"/>'s.</summary>
    public async Task SendRawAsync(ReadOnlyMemory<byte> bytes, CancellationToken cancellationToken = default)
    {
        await _writeLock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await _stream.WriteAsync(bytes, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _writeLock.Release();
        }
    }

    private async Task SendAsync(JsonObject message, CancellationToken cancellationToken)
    {
        // One object, one line: QMP servers accept any framing, but a line is what humans and logs read.
        var bytes = JsonSerializer.SerializeToUtf8Bytes(message);
        await _writeLock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await _stream.WriteAsync(bytes, cancellationToken).ConfigureAwait(false);
            await _stream.WriteAsync(Newline, cancellationToken).ConfigureAwait(false);
        }
        catch (IOException e)
        {
            throw new QmpConnectionException("the QMP connection broke", e);
        }
        finally
        {
            _writeLock.Release();
        }
    }

    private async Task ReadLoopAsync()
    {
        var framer = new QmpFramer();
        Exception? error = null;
        try
        {
            while (true)
            {
                var result = await _input.ReadAsync(_closing.Token).ConfigureAwait(false);
                var buffer = result.Buffer;
                while (true)
                {
                    var frame = framer.TryRead(buffer, out var message, out var consumed, out var examined);
                    if (frame == QmpFrame.Incomplete)
                    {
                        _input.AdvanceTo(consumed, examined);
                        break;
                    }
                    if (frame == QmpFrame.Message)
                    {
                        Dispatch(message);
                    }
                    else
                    {
                        GarbageLines++;
                    }
                    buffer = buffer.Slice(consumed);
                }
                if (result.IsCompleted)
                {
                    break;
                }
            }
        }
        catch (OperationCanceledException)
        {
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
        {
            error = e;
        }
        Close(error);
    }

    private void Dispatch(ReadOnlySequence<byte> bytes)
    {
        JsonObject? message;
        try
        {
            var reader = new Utf8JsonReader(bytes);
            message = JsonNode.Parse(ref reader) as JsonObject;
        }
        catch (JsonException)
        {
            GarbageLines++;
            return;
        }
        if (message is null)
        {
            GarbageLines++;
            return;
        }
        if (message.ContainsKey("QMP"))
        {
            _greeting.TrySetResult(message);
            return;
        }
        if (message.ContainsKey("event"))
        {
            var e = QmpEvent.From(message);
            List<QmpEventListener> listeners;
            lock (_listenersLock)
            {
                listeners = _listeners;
            }
            foreach (var l in listeners)
            {
                l.Deliver(e);
            }
            return;
        }
        if (message["id"] is JsonValue idValue && idValue.TryGetValue<long>(out var id))
        {
            if (_pending.TryGetValue(id, out var p))
            {
                p.Reply.TrySetResult(message);
                return;
            }
        }
        else if (!message.ContainsKey("id"))
        {
            // A reply without an id answers input the server could not read as a command; QMP servers answer
            // in order, so it belongs to the oldest command still waiting.
            var oldest = _pending.OrderBy(kv => kv.Key).Select(kv => kv.Value).FirstOrDefault();
            if (oldest is not null)
            {
                oldest.Reply.TrySetResult(message);
                return;
            }
        }
        _unclaimed.Writer.TryWrite(message);
    }

    private void Close(Exception? error)
    {
        var reason = new QmpConnectionException("the QMP connection closed", error ?? new IOException("end of stream"));
        List<QmpEventListener> listeners;
        lock (_listenersLock)
        {
            _closedBecause = reason;
            listeners = _listeners;
            _listeners = [];
        }
        _greeting.TrySetException(new QmpConnectionException("the server closed the connection before its QMP greeting"));
        _unclaimed.Writer.TryComplete();
        foreach (var (_, p) in _pending)
        {
            p.Reply.TrySetException(new QmpConnectionException($"the QMP connection closed before the reply to {p.Command}", error ?? reason));
        }
        foreach (var l in listeners)
        {
            l.Complete(null);
        }
    }

    /// <summary>True once the server has closed the connection (or it broke).</summary>
    public bool IsClosed => Volatile.Read(ref _closedBecause) is not null;

    public async ValueTask DisposeAsync()
    {
        if (!_closing.IsCancellationRequested)
        {
            await _closing.CancelAsync().ConfigureAwait(false);
        }
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (SocketException)
        {
        }
        catch (ObjectDisposedException)
        {
        }
        await _readLoop.ConfigureAwait(false);
        await _input.CompleteAsync().ConfigureAwait(false);
        await _stream.DisposeAsync().ConfigureAwait(false);
        _writeLock.Dispose();
        _closing.Dispose();
    }
}
