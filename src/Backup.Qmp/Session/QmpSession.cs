using System.Buffers;
using System.IO.Pipelines;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Threading.Channels;
using Backup.Block;
using Backup.Qmp.Commands;
using Backup.Qmp.Framing;
using Backup.Qmp.Logging;
using Microsoft.Extensions.Logging;

namespace Backup.Qmp.Session;

/// <summary>
/// One client connection: greeting, capabilities negotiation, then requests answered in order. Input
/// is framed with a size limit; output goes through a bounded queue so that a client that stops
/// reading cannot make the daemon buffer without bound (it is disconnected instead) and never holds
/// up another session.
/// </summary>
public sealed class QmpSession : IDisposable
{
    /// <summary>Largest request accepted; larger ones get an error and are skipped to the next line.</summary>
    public const int MaxMessageBytes = 16 * 1024 * 1024;

    /// <summary>Replies and events waiting for a slow reader before it is disconnected.</summary>
    public const int MaxQueuedOutput = 4096;

    private static readonly byte[] LineEnd = "\r\n"u8.ToArray();

    private readonly Stream _stream;
    private readonly QmpDispatcher _dispatcher;
    private readonly ILogger _logger;
    private readonly Channel<byte[]> _output = Channel.CreateBounded<byte[]>(new BoundedChannelOptions(MaxQueuedOutput)
    {
        SingleReader = true,
        FullMode = BoundedChannelFullMode.Wait,
    });
    private readonly CancellationTokenSource _closed = new();
    private readonly ErrorBudget _malformedInput = new(perSecond: 1000);
    private volatile bool _negotiated;

    public QmpSession(Stream stream, QmpDispatcher dispatcher, ILogger logger, string peer)
    {
        _stream = stream;
        _dispatcher = dispatcher;
        _logger = logger;
        Peer = peer;
    }

    public string Peer { get; }

    /// <summary>True once qmp_capabilities succeeded: commands run and events are delivered.</summary>
    public bool Negotiated => _negotiated;

    public bool OobEnabled { get; private set; }

    internal void CompleteNegotiation(bool oob)
    {
        OobEnabled = oob;
        _negotiated = true;
    }

    /// <summary>How long queued output may take to drain once the session is closing.</summary>
    private static readonly TimeSpan DrainTimeout = TimeSpan.FromSeconds(2);

    public async Task RunAsync(JsonObject greeting, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(greeting);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _closed.Token);
        var ct = linked.Token;
        using var writeCancel = new CancellationTokenSource();
        var writer = WriteLoopAsync(writeCancel.Token);
        try
        {
            await EnqueueAsync(greeting, ct).ConfigureAwait(false);
            await ReadLoopAsync(ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is OperationCanceledException or ChannelClosedException)
        {
        }
        catch (IOException e)
        {
            _logger.LogDebug("QMP {Client}: connection error: {Error}", Peer, e.Message);
        }
        finally
        {
            // Let queued replies (e.g. quit's) reach the client, but not wait forever for one that does not read.
            _output.Writer.TryComplete();
            writeCancel.CancelAfter(DrainTimeout);
            try
            {
                await writer.ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or OperationCanceledException or ObjectDisposedException)
            {
                // The peer went away while we were still writing to it.
            }
        }
    }

    /// <summary>Queues an event for this client; a client too far behind is disconnected rather than buffered forever.</summary>
    public void SendEvent(byte[] serializedEvent)
    {
        if (!_negotiated)
        {
            return;
        }
        if (!_output.Writer.TryWrite(serializedEvent))
        {
            _logger.LogWarning("QMP {Client}: not reading its output; disconnecting", Peer);
            Close();
        }
    }

    /// <summary>Stops reading requests; what is queued is still sent (for a bounded time).</summary>
    public void Close()
    {
        try
        {
            _closed.Cancel();
        }
        catch (ObjectDisposedException)
        {
        }
    }

    private async Task ReadLoopAsync(CancellationToken ct)
    {
        var reader = PipeReader.Create(_stream, new StreamPipeReaderOptions(bufferSize: 64 * 1024, leaveOpen: true));
        var framer = new JsonMessageFramer(MaxMessageBytes);
        try
        {
            while (true)
            {
                var result = await reader.ReadAsync(ct).ConfigureAwait(false);
                var buffer = result.Buffer;
                while (true)
                {
                    var kind = framer.TryRead(buffer, out var message, out var consumed, out var examined);
                    if (kind == FrameKind.Incomplete)
                    {
                        reader.AdvanceTo(consumed, examined);
                        break;
                    }
                    if (kind == FrameKind.Message)
                    {
                        var size = message.Length;
                        await ProcessMessageAsync(message, ct).ConfigureAwait(false);
                        buffer = buffer.Slice(consumed);
                        LargeMessageReclaimer.After(size);
                        continue;
                    }
                    LargeMessageReclaimer.After(buffer.Slice(0, consumed).Length);
                    buffer = buffer.Slice(consumed);
                    await ReplyAsync(Error(ErrorClass.GenericError, framer.LastError, null), ct).ConfigureAwait(false);
                    await _malformedInput.WaitAsync(ct).ConfigureAwait(false);
                }
                if (result.IsCompleted)
                {
                    return;
                }
            }
        }
        finally
        {
            await reader.CompleteAsync().ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Parses and answers one framed message. Its own method, so that the request tree dies with this call:
    /// a local of the read loop lives on in the loop's state machine until the next message arrives, and
    /// kept a 100 MB tree from a 6.5 MB message alive (and out of the reclaimer's reach) for good.
    /// </summary>
    private async ValueTask ProcessMessageAsync(ReadOnlySequence<byte> message, CancellationToken ct)
    {
        JsonNode? request;
        try
        {
            // Synchronously, before the first await: the message's bytes are the pipe's until the loop advances it.
            request = ParseMessage(message);
        }
        catch (JsonException e)
        {
            // The framer has checked the syntax; what is left is a repeated member name.
            _logger.LogDebug("QMP {Client}: parse error: {Error}", Peer, e.Message);
            await ReplyAsync(Error(ErrorClass.GenericError, "JSON parse error, duplicate key", null), ct).ConfigureAwait(false);
            await _malformedInput.WaitAsync(ct).ConfigureAwait(false);
            return;
        }
        try
        {
            await HandleRequestAsync(request, ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not (OperationCanceledException or ChannelClosedException or IOException))
        {
            // A request the code did not foresee ends in an error reply, never in a dropped session.
            _logger.LogError(e, "QMP {Client}: request failed unexpectedly", Peer);
            await ReplyAsync(Error(ErrorClass.GenericError, InternalErrorDesc, null), ct).ConfigureAwait(false);
        }
    }

    /// <summary>Duplicate member names are refused, as QEMU's parser does; .NET would accept the JSON and fail on first use.</summary>
    private static readonly JsonDocumentOptions RequestOptions = new()
    {
        MaxDepth = JsonMessageFramer.MaxNesting + 1,
        AllowDuplicateProperties = false,
    };

    /// <summary>
    /// The shared pool keeps up to 32 arrays per size and core: pooling megabyte copies kept 50 MB after a
    /// fuzz run. Small copies (the common case) are pooled, larger ones left to the GC.
    /// </summary>
    private const int MaxPooledParseBuffer = 64 * 1024;

    private static JsonNode? ParseMessage(ReadOnlySequence<byte> message)
    {
        if (message.IsSingleSegment)
        {
            return JsonNode.Parse(message.FirstSpan, null, RequestOptions);
        }
        // Parse copies what it keeps, so this buffer is only borrowed; a large one is not pooled, so that
        // the memory of a rare huge message is not held by the pool afterwards.
        var length = (int)message.Length;
        var pooled = length <= MaxPooledParseBuffer;
        var bytes = pooled ? ArrayPool<byte>.Shared.Rent(length) : GC.AllocateUninitializedArray<byte>(length);
        try
        {
            message.CopyTo(bytes);
            return JsonNode.Parse(bytes.AsSpan(0, length), null, RequestOptions);
        }
        finally
        {
            if (pooled)
            {
                ArrayPool<byte>.Shared.Return(bytes);
            }
        }
    }

    /// <summary>What a client reads when a command fails in a way nobody wrote an error for; the details go to the log.</summary>
    internal const string InternalErrorDesc = "Internal error; the daemon's log has the details";

    private async ValueTask HandleRequestAsync(JsonNode? request, CancellationToken ct)
    {
        if (request is not JsonObject obj)
        {
            await ReplyAsync(Error(ErrorClass.GenericError, "QMP input must be a JSON object", null), ct).ConfigureAwait(false);
            return;
        }
        var id = obj["id"]?.DeepClone();
        var hasId = obj.ContainsKey("id");
        JsonObject reply;
        CommandContext? context = null;
        string? command = null;
        try
        {
            var (name, arguments, oob) = ParseRequest(obj);
            if (oob)
            {
                throw new BlockException($"The command {name} does not support OOB");
            }
            if (!_negotiated && name != "qmp_capabilities")
            {
                throw new BlockException("Expecting capabilities negotiation with 'qmp_capabilities'", ErrorClass.CommandNotFound);
            }
            if (_negotiated && name == "qmp_capabilities")
            {
                throw new BlockException("Capabilities negotiation is already complete, command ignored", ErrorClass.CommandNotFound);
            }
            command = name;
            if (_logger.IsEnabled(LogLevel.Debug))
            {
                _logger.LogDebug("QMP {Client}: {Command} {Arguments} (id {Id})", Peer, name, CommandLog.Arguments(name, arguments),
                    hasId ? id?.ToJsonString() ?? "null" : "none");
            }
            context = new CommandContext(this);
            var result = await _dispatcher.ExecuteAsync(name, arguments, context, ct).ConfigureAwait(false);
            reply = new JsonObject { ["return"] = result };
        }
        catch (BlockException e)
        {
            _logger.LogDebug("QMP {Client}: {Command} failed: {ErrorClass}: {Error}", Peer, command ?? "(invalid request)", e.ErrorClass, e.Message);
            reply = Error(e.ErrorClass, e.Message, null);
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            // A bug must not take the daemon (or this session) down; the client sees a GenericError.
            // .NET's text is for us, not for the client (design §5).
            _logger.LogError(e, "QMP {Client}: command failed unexpectedly", Peer);
            reply = Error(ErrorClass.GenericError, InternalErrorDesc, null);
        }
        if (hasId)
        {
            // QEMU puts the id last in a success reply and first in an error reply.
            reply = reply.ContainsKey("return")
                ? new JsonObject { ["return"] = reply["return"]!.DeepClone(), ["id"] = id }
                : new JsonObject { ["id"] = id, ["error"] = reply["error"]!.DeepClone() };
        }
        await ReplyAsync(reply, ct).ConfigureAwait(false);
        if (reply.ContainsKey("return"))
        {
            context?.RunAfterReply();
        }
    }

    /// <summary>QEMU's qmp_dispatch_check_obj: every member is known and well-typed.</summary>
    private (string Name, JsonObject? Arguments, bool Oob) ParseRequest(JsonObject obj)
    {
        string? execute = null;
        var oob = false;
        JsonObject? arguments = null;
        foreach (var (key, value) in obj)
        {
            switch (key)
            {
                case "execute" or "exec-oob":
                    if (value is not JsonValue v || v.GetValueKind() != JsonValueKind.String)
                    {
                        throw new BlockException($"QMP input member '{key}' must be a string");
                    }
                    if (key == "exec-oob")
                    {
                        if (!OobEnabled)
                        {
                            throw new BlockException("QMP input member 'exec-oob' is unexpected");
                        }
                        oob = true;
                    }
                    execute = v.GetValue<string>();
                    break;
                case "arguments":
                    arguments = value as JsonObject ?? throw new BlockException("QMP input member 'arguments' must be an object");
                    break;
                case "id":
                    break;
                default:
                    throw new BlockException($"QMP input member '{key}' is unexpected");
            }
        }
        if (obj.ContainsKey("execute") && obj.ContainsKey("exec-oob"))
        {
            throw new BlockException("QMP input must not contain both 'execute' and 'exec-oob'");
        }
        return (execute ?? throw new BlockException("QMP input lacks member 'execute'"), arguments, oob);
    }

    private static JsonObject Error(ErrorClass errorClass, string desc, JsonNode? id)
    {
        var e = new JsonObject
        {
            ["error"] = new JsonObject { ["class"] = errorClass.ToString(), ["desc"] = desc },
        };
        if (id is not null)
        {
            e["id"] = id;
        }
        return e;
    }

    private ValueTask ReplyAsync(JsonObject reply, CancellationToken ct) => EnqueueAsync(reply, ct);

    private ValueTask EnqueueAsync(JsonObject message, CancellationToken ct)
    {
        var bytes = Serialize(message);
        return _output.Writer.WriteAsync(bytes, ct);
    }

    /// <summary>Deep enough for any id a request may carry (echoed back), which the writer's default 1000 is not.</summary>
    private static readonly JsonWriterOptions WriterOptions = new()
    {
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
        MaxDepth = JsonMessageFramer.MaxNesting + 2,
    };

    public static byte[] Serialize(JsonNode message)
    {
        ArgumentNullException.ThrowIfNull(message);
        var buffer = new ArrayBufferWriter<byte>(256);
        using (var w = new Utf8JsonWriter(buffer, WriterOptions))
        {
            message.WriteTo(w);
        }
        buffer.Write(LineEnd);
        return buffer.WrittenSpan.ToArray();
    }

    private async Task WriteLoopAsync(CancellationToken ct)
    {
        await foreach (var chunk in _output.Reader.ReadAllAsync(ct).ConfigureAwait(false))
        {
            await _stream.WriteAsync(chunk, ct).ConfigureAwait(false);
        }
        await _stream.FlushAsync(ct).ConfigureAwait(false);
    }

    public void Dispose() => _closed.Dispose();

    public override string ToString() => "QMP session " + Peer + (Negotiated ? "" : " (negotiating)");

}
