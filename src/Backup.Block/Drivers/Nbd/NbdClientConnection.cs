using System.Buffers.Binary;
using System.IO.Pipelines;
using Backup.Nbd.Protocol;

namespace Backup.Block.Drivers.Nbd;

/// <summary>A reply that breaks the protocol (wrong cookie, bad magic, oversize chunk): the connection cannot go on.</summary>
public sealed class NbdProtocolException(string message) : IOException(message, 5);

/// <summary>
/// One transmission-phase connection to an NBD server, with many requests in flight (libnbd's and QEMU's
/// scheme): a request table keyed by cookie (slot index in the low half, the slot's use count in the high
/// half), one reader task that reads every reply and completes the request it names, and a send lock that
/// keeps request frames whole. A request allocates nothing: its slot holds the header buffer and a reusable
/// completion, and READ payloads go straight from the socket into the caller's buffer.
/// When the connection ends (the server went away, a send failed, or a reply broke the protocol) every
/// request still waiting completes as <see cref="NbdReplyOutcome.ConnectionLost"/> and <see cref="Closed"/>
/// says why; the node decides whether to reconnect.
/// </summary>
public sealed class NbdClientConnection : IAsyncDisposable
{
    /// <summary>Requests in flight at once on one connection.</summary>
    public const int MaxInFlight = 64;

    // Longest payload of a non-data chunk we accept: an error with its message, or a block-status reply
    // (QEMU's server sends at most a few thousand descriptors; anything far beyond is a broken server).
    private const int MaxMetaChunk = 1 << 20;

    private readonly Stream _stream;
    private readonly PipeReader _reader;
    private readonly NbdRequestSlot[] _slots = new NbdRequestSlot[MaxInFlight];
    private readonly Stack<int> _free = new(MaxInFlight);
    private readonly SemaphoreSlim _slotsAvailable = new(MaxInFlight, MaxInFlight);
    private readonly SemaphoreSlim _sendLock = new(1, 1);
    private readonly Lock _tableLock = new();
    private readonly Task _readerTask;
    private readonly TaskCompletionSource<Exception?> _closed = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly IDisposable? _socket;
    private bool _closing;
    private bool _disposed;

    public NbdClientConnection(Stream stream, NbdExportInfo info, IDisposable? socket = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(info);
        _stream = stream;
        _socket = socket;
        Info = info;
        _reader = PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: 64 * 1024, minimumReadSize: 4096, leaveOpen: true));
        for (var i = MaxInFlight - 1; i >= 0; i--)
        {
            _slots[i] = new NbdRequestSlot(i);
            _free.Push(i);
        }
        _readerTask = Task.Run(ReadRepliesAsync);
    }

    public NbdExportInfo Info { get; }

    /// <summary>Completes when the connection has ended: null for a clean close, else why it broke.</summary>
    public Task<Exception?> Closed => _closed.Task;

    public bool IsClosed => _closed.Task.IsCompleted;

    /// <summary>
    /// Sends one request and waits for its reply. <paramref name="write"/> is the WRITE payload;
    /// <paramref name="read"/> receives READ data. Cancellation only applies while waiting for a free slot
    /// or the send lock: a request on the wire is always answered (or lost with the connection).
    /// </summary>
    public async ValueTask<NbdReply> RequestAsync(ushort type, ushort flags, ulong offset, uint length,
        ReadOnlyMemory<byte> write, Memory<byte> read, CancellationToken cancellationToken)
    {
        await _slotsAvailable.WaitAsync(cancellationToken).ConfigureAwait(false);
        NbdRequestSlot slot;
        lock (_tableLock)
        {
            if (_closing)
            {
                _slotsAvailable.Release();
                return NbdReply.Lost;
            }
            slot = _slots[_free.Pop()];
            slot.Begin(type, offset, length, read);
        }
        try
        {
            new NbdRequest(NbdWire.NBD_REQUEST_MAGIC, flags, type, slot.Cookie, offset, length).WriteTo(slot.Header);
            var sent = false;
            try
            {
                await _sendLock.WaitAsync(cancellationToken).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                Abandon(slot);
                throw;
            }
            try
            {
                if (!IsClosed)
                {
                    await _stream.WriteAsync(slot.Header, CancellationToken.None).ConfigureAwait(false);
                    if (!write.IsEmpty)
                    {
                        await _stream.WriteAsync(write, CancellationToken.None).ConfigureAwait(false);
                    }
                    sent = true;
                }
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or System.Net.Sockets.SocketException)
            {
                // A half-sent frame leaves the stream unusable: end the connection; the reader fails the table.
                Abort(e);
            }
            finally
            {
                _sendLock.Release();
            }
            if (!sent)
            {
                slot.Complete(NbdReply.Lost);
            }
            return await slot.Task.ConfigureAwait(false);
        }
        finally
        {
            lock (_tableLock)
            {
                slot.End();
                _free.Push(slot.Index);
            }
            _slotsAvailable.Release();
        }
    }

    private static void Abandon(NbdRequestSlot slot) => slot.Complete(NbdReply.Lost);

    /// <summary>Ends the connection at once (the reader stops and fails what is in flight).</summary>
    public void Abort(Exception? reason = null)
    {
        if (reason is not null)
        {
            _closed.TrySetResult(reason);
        }
        try
        {
            _socket?.Dispose();
            _stream.Dispose();
        }
        catch (IOException)
        {
        }
        _reader.CancelPendingRead();
    }

    // ------------------------------------------------------------------ the reply reader

    private async Task ReadRepliesAsync()
    {
        Exception? failure = null;
        try
        {
            var header = new byte[NbdStructuredReplyHeader.Size];
            while (true)
            {
                if (!await _reader.ReadExactAsync(header.AsMemory(0, NbdSimpleReply.Size), CancellationToken.None).ConfigureAwait(false))
                {
                    failure = new IOException("Connection closed by the server", 5);
                    break;
                }
                var magic = BinaryPrimitives.ReadUInt32BigEndian(header);
                if (magic == NbdWire.NBD_SIMPLE_REPLY_MAGIC)
                {
                    await ReadSimpleReplyAsync(header).ConfigureAwait(false);
                }
                else if (magic == NbdWire.NBD_STRUCTURED_REPLY_MAGIC && Info.StructuredReplies)
                {
                    if (!await _reader.ReadExactAsync(header.AsMemory(NbdSimpleReply.Size, 4), CancellationToken.None).ConfigureAwait(false))
                    {
                        failure = new IOException("Connection closed by the server", 5);
                        break;
                    }
                    await ReadChunkAsync(header).ConfigureAwait(false);
                }
                else
                {
                    throw new NbdProtocolException($"invalid reply magic 0x{magic:x8}");
                }
            }
        }
        catch (NbdProtocolException e)
        {
            failure = e;
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or OperationCanceledException or InvalidOperationException)
        {
            failure = e;
        }
        finally
        {
            FailInFlight(failure);
        }
    }

    private void FailInFlight(Exception? failure)
    {
        List<NbdRequestSlot> pending = [];
        lock (_tableLock)
        {
            _closing = true;
            foreach (var s in _slots)
            {
                if (s.InUse)
                {
                    pending.Add(s);
                }
            }
        }
        _closed.TrySetResult(_disposed ? null : failure ?? new IOException("Connection closed", 5));
        foreach (var s in pending)
        {
            s.Complete(NbdReply.Lost);
        }
        try
        {
            _socket?.Dispose();
            _stream.Dispose();
        }
        catch (IOException)
        {
        }
    }

    private NbdRequestSlot Find(ulong cookie)
    {
        var index = (uint)cookie;
        NbdRequestSlot? slot = index < MaxInFlight ? _slots[index] : null;
        lock (_tableLock)
        {
            if (slot is null || !slot.InUse || slot.Cookie != cookie || slot.IsCompleted)
            {
                throw new NbdProtocolException($"unexpected cookie 0x{cookie:x16} in reply");
            }
        }
        return slot;
    }

    private async ValueTask ReadSimpleReplyAsync(byte[] header)
    {
        NbdSimpleReply.TryRead(header, out var reply);
        var slot = Find(reply.Cookie);
        if (Info.StructuredReplies && slot.Type == NbdWire.NBD_CMD_READ && reply.Error == 0)
        {
            throw new NbdProtocolException("simple reply to a structured READ");
        }
        if (slot.Type == NbdWire.NBD_CMD_READ && reply.Error == 0)
        {
            if (!await _reader.ReadExactAsync(_stream, slot.ReadBuffer, CancellationToken.None).ConfigureAwait(false))
            {
                throw new IOException("Connection closed by the server", 5);
            }
            slot.Covered = slot.Length;
        }
        if (slot.Type == NbdWire.NBD_CMD_BLOCK_STATUS && reply.Error == 0)
        {
            throw new NbdProtocolException("simple reply to NBD_CMD_BLOCK_STATUS");
        }
        slot.Complete(new NbdReply(NbdReplyOutcome.Replied, reply.Error, 0, 0));
    }

    private async ValueTask ReadChunkAsync(byte[] header)
    {
        NbdStructuredReplyHeader.TryRead(header, out var chunk);
        var slot = Find(chunk.Cookie);
        var done = (chunk.Flags & NbdWire.NBD_REPLY_FLAG_DONE) != 0;
        switch (chunk.Type)
        {
            case NbdWire.NBD_REPLY_TYPE_NONE:
                if (chunk.Length != 0 || !done)
                {
                    throw new NbdProtocolException("NBD_REPLY_TYPE_NONE chunk with a payload or without the DONE flag");
                }
                break;
            case NbdWire.NBD_REPLY_TYPE_OFFSET_DATA:
                await ReadDataChunkAsync(slot, chunk).ConfigureAwait(false);
                break;
            case NbdWire.NBD_REPLY_TYPE_OFFSET_HOLE:
                await ReadHoleChunkAsync(slot, chunk).ConfigureAwait(false);
                break;
            case NbdWire.NBD_REPLY_TYPE_BLOCK_STATUS:
                await ReadBlockStatusChunkAsync(slot, chunk).ConfigureAwait(false);
                break;
            case NbdWire.NBD_REPLY_TYPE_ERROR or NbdWire.NBD_REPLY_TYPE_ERROR_OFFSET:
                await ReadErrorChunkAsync(slot, chunk).ConfigureAwait(false);
                break;
            default:
                if ((chunk.Type & 0x8000) != 0)
                {
                    // An error type we do not know still carries an error value first (proto.md).
                    await ReadErrorChunkAsync(slot, chunk).ConfigureAwait(false);
                    break;
                }
                throw new NbdProtocolException($"unexpected reply chunk type {chunk.Type}");
        }
        if (done)
        {
            if (slot.Error == 0 && slot.Type == NbdWire.NBD_CMD_READ && slot.Covered != slot.Length)
            {
                throw new NbdProtocolException($"READ reply covered {slot.Covered} of {slot.Length} bytes");
            }
            if (slot.Error == 0 && slot.Type == NbdWire.NBD_CMD_BLOCK_STATUS && !slot.HasExtent)
            {
                throw new NbdProtocolException("block status reply without an extent");
            }
            slot.Complete(new NbdReply(NbdReplyOutcome.Replied, slot.Error, slot.ExtentLength, slot.ExtentFlags));
        }
    }

    private async ValueTask ReadDataChunkAsync(NbdRequestSlot slot, NbdStructuredReplyHeader chunk)
    {
        if (slot.Type != NbdWire.NBD_CMD_READ)
        {
            throw new NbdProtocolException("data chunk in a reply to a request that is not a READ");
        }
        if (chunk.Length <= 8 || chunk.Length - 8 > slot.Length)
        {
            throw new NbdProtocolException($"oversize or empty data chunk ({chunk.Length} bytes for a READ of {slot.Length})");
        }
        var offset = await ReadUInt64Async().ConfigureAwait(false);
        var length = chunk.Length - 8;
        if (offset < slot.Offset || offset - slot.Offset + length > slot.Length)
        {
            throw new NbdProtocolException($"data chunk at {offset}+{length} outside the READ of {slot.Offset}+{slot.Length}");
        }
        var at = (int)(offset - slot.Offset);
        if (!await _reader.ReadExactAsync(_stream, slot.ReadBuffer.Slice(at, (int)length), CancellationToken.None).ConfigureAwait(false))
        {
            throw new IOException("Connection closed by the server", 5);
        }
        slot.Covered += length;
    }

    private async ValueTask ReadHoleChunkAsync(NbdRequestSlot slot, NbdStructuredReplyHeader chunk)
    {
        if (slot.Type != NbdWire.NBD_CMD_READ || chunk.Length != NbdOffsetHole.Size)
        {
            throw new NbdProtocolException("malformed hole chunk");
        }
        var offset = await ReadUInt64Async().ConfigureAwait(false);
        var length = await ReadUInt32Async().ConfigureAwait(false);
        if (length == 0 || offset < slot.Offset || offset - slot.Offset + length > slot.Length)
        {
            throw new NbdProtocolException($"hole chunk at {offset}+{length} outside the READ of {slot.Offset}+{slot.Length}");
        }
        slot.ReadBuffer.Span.Slice((int)(offset - slot.Offset), (int)length).Clear();
        slot.Covered += length;
    }

    private async ValueTask ReadBlockStatusChunkAsync(NbdRequestSlot slot, NbdStructuredReplyHeader chunk)
    {
        if (slot.Type != NbdWire.NBD_CMD_BLOCK_STATUS || chunk.Length < 12 || (chunk.Length - 4) % NbdBlockDescriptor.Size != 0 ||
            chunk.Length > MaxMetaChunk)
        {
            throw new NbdProtocolException($"malformed block status chunk of {chunk.Length} bytes");
        }
        var id = await ReadUInt32Async().ConfigureAwait(false);
        if (id != Info.MetaContextId)
        {
            throw new NbdProtocolException($"block status for context {id}, which was not negotiated");
        }
        var length = await ReadUInt32Async().ConfigureAwait(false);
        var flags = await ReadUInt32Async().ConfigureAwait(false);
        if (!await _reader.SkipAsync(chunk.Length - 12, CancellationToken.None).ConfigureAwait(false))
        {
            throw new IOException("Connection closed by the server", 5);
        }
        if (length == 0)
        {
            throw new NbdProtocolException("block status extent of length 0");
        }
        if (slot.HasExtent)
        {
            throw new NbdProtocolException("more than one block status chunk for one context");
        }
        slot.HasExtent = true;
        slot.ExtentLength = Math.Min(length, slot.Length);
        slot.ExtentFlags = flags;
    }

    private async ValueTask ReadErrorChunkAsync(NbdRequestSlot slot, NbdStructuredReplyHeader chunk)
    {
        if (chunk.Length < 6 || chunk.Length > MaxMetaChunk)
        {
            throw new NbdProtocolException($"malformed error chunk of {chunk.Length} bytes");
        }
        var error = await ReadUInt32Async().ConfigureAwait(false);
        var messageLength = (ushort)(await ReadUInt32Async(2).ConfigureAwait(false));
        if (error == 0 || messageLength > chunk.Length - 6)
        {
            throw new NbdProtocolException("error chunk without an error value or with a message longer than the chunk");
        }
        if (!await _reader.SkipAsync(chunk.Length - 6, CancellationToken.None).ConfigureAwait(false))
        {
            throw new IOException("Connection closed by the server", 5);
        }
        if (slot.Error == 0)
        {
            slot.Error = error;
        }
    }

    private readonly byte[] _scratch = new byte[8];

    private async ValueTask<ulong> ReadUInt64Async()
    {
        if (!await _reader.ReadExactAsync(_scratch.AsMemory(0, 8), CancellationToken.None).ConfigureAwait(false))
        {
            throw new IOException("Connection closed by the server", 5);
        }
        return BinaryPrimitives.ReadUInt64BigEndian(_scratch);
    }

    private async ValueTask<uint> ReadUInt32Async(int size = 4)
    {
        if (!await _reader.ReadExactAsync(_scratch.AsMemory(0, size), CancellationToken.None).ConfigureAwait(false))
        {
            throw new IOException("Connection closed by the server", 5);
        }
        return size == 4 ? BinaryPrimitives.ReadUInt32BigEndian(_scratch) : BinaryPrimitives.ReadUInt16BigEndian(_scratch);
    }

    /// <summary>Sends NBD_CMD_DISC when the connection still works, then closes it.</summary>
    public async ValueTask DisposeAsync()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        if (!IsClosed && await _sendLock.WaitAsync(TimeSpan.FromSeconds(1)).ConfigureAwait(false))
        {
            try
            {
                var disc = new byte[NbdRequest.Size];
                new NbdRequest(NbdWire.NBD_REQUEST_MAGIC, 0, NbdWire.NBD_CMD_DISC, ulong.MaxValue, 0, 0).WriteTo(disc);
                using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(1));
                await _stream.WriteAsync(disc, cts.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or OperationCanceledException or System.Net.Sockets.SocketException)
            {
            }
            finally
            {
                _sendLock.Release();
            }
        }
        _closed.TrySetResult(null);
        Abort();
        await _readerTask.ConfigureAwait(false);
        await _reader.CompleteAsync().ConfigureAwait(false);
    }
}
