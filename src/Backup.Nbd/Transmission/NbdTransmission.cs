using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Text;
using Backup.Block;
using Backup.Nbd.Exports;
using Backup.Nbd.Handshake;
using Backup.Nbd.Protocol;
using Microsoft.Extensions.Logging;

namespace Backup.Nbd.Transmission;

/// <summary>
/// The transmission phase of one connection (proto.md "Transmission"). One loop reads requests in
/// order; each request is validated (<see cref="Validate"/>) before anything acts on it, WRITE payloads
/// are read completely before the request is started (a truncated payload is never written), and valid
/// requests then run concurrently, up to <see cref="MaxInFlight"/> at once, replying as they finish
/// (possibly out of order). Replies are written whole, one at a time, under a lock; chunks of one
/// structured reply may interleave with other replies, which the protocol allows.
///
/// The connection ends on NBD_CMD_DISC, on a framing error (bad magic), when the peer closes, or when
/// the export is removed; in every case requests already started are allowed to finish before
/// <see cref="RunAsync"/> returns, so the node is never used after its export is released.
/// </summary>
internal sealed class NbdTransmission : IDisposable
{
    /// <summary>Requests of one connection running at once; bounds memory to about MaxInFlight × 32 MiB.</summary>
    internal const int MaxInFlight = 16;

    /// <summary>Descriptors per context in one NBD_REPLY_TYPE_BLOCK_STATUS chunk; clients ask again for the rest.</summary>
    internal const int MaxExtents = 1024;

    /// <summary>Extents looked up per READ to find holes; the rest of the range is sent as data.</summary>
    private const int MaxReadExtents = 64;

    private const int CacheChunk = 1 << 20;

    /// <summary>WRITE payloads at least this large are read from the socket straight into their buffer, not through the pipe.</summary>
    internal const int DirectPayloadThreshold = 64 * 1024;

    /// <summary>Room kept in front of READ data for the reply header, so header and data go out in one write.</summary>
    private const int ReadReplyPrefix = NbdStructuredReplyHeader.Size + 8;

    private readonly BlockNode _node;
    private readonly long _size;
    private readonly bool _structured;
    private readonly bool _writable;
    private readonly bool _writethrough;
    private readonly IExportMetaContext[] _contexts;
    private readonly uint[] _contextIds;
    private readonly PipeReader _input;
    private readonly Stream? _inputStream;
    private readonly Stream _output;
    private readonly ILogger _logger;
    private readonly string _client;
    private readonly SemaphoreSlim _writeLock = new(1, 1);
    private readonly SemaphoreSlim _slots = new(MaxInFlight, MaxInFlight);
    private readonly CancellationTokenSource _abort;

    /// <param name="inputStream">The stream <paramref name="input"/> was made from with <c>PipeReader.Create</c>, if any:
    /// large WRITE payloads are then read from it directly.</param>
    public NbdTransmission(HandshakeResult handshake, PipeReader input, Stream output, ILogger logger, string client, CancellationToken cancellationToken,
        Stream? inputStream = null)
    {
        ArgumentNullException.ThrowIfNull(handshake);
        var export = handshake.Export;
        _node = export.Node;
        _size = handshake.Size;
        _structured = handshake.StructuredReplies;
        _writable = export.Writable;
        _writethrough = export.Writethrough;
        _contexts = handshake.MetaContextIds.Select(i => export.Contexts[i]).ToArray();
        _contextIds = handshake.MetaContextIds.Select(i => (uint)i).ToArray();
        _input = input;
        _inputStream = inputStream;
        _output = output;
        _logger = logger;
        _client = client;
        _abort = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
    }

    public async Task RunAsync()
    {
        var ct = _abort.Token;
        var header = new byte[NbdRequest.Size];
        try
        {
            while (!ct.IsCancellationRequested)
            {
                if (!await _input.ReadExactAsync(header, ct).ConfigureAwait(false))
                {
                    break; // peer closed, possibly mid-header: nothing was started for it
                }
                NbdRequest.TryRead(header, out var request);
                if (request.Magic != NbdWire.NBD_REQUEST_MAGIC)
                {
                    _logger.LogInformation("NBD client {Client}: invalid request: bad magic 0x{Magic:x}, closing", _client, request.Magic);
                    break;
                }
                if (request.Type == NbdWire.NBD_CMD_DISC)
                {
                    break;
                }
                var (error, message) = Validate(request);
                byte[]? payload = null;
                if (request.Type == NbdWire.NBD_CMD_WRITE)
                {
                    if (error != NbdWire.NBD_SUCCESS)
                    {
                        // Keep the stream in sync: the payload follows whatever we think of the request.
                        if (!await _input.SkipAsync(request.Length, ct).ConfigureAwait(false))
                        {
                            break;
                        }
                    }
                    else
                    {
                        payload = ArrayPool<byte>.Shared.Rent((int)request.Length);
                        var destination = payload.AsMemory(0, (int)request.Length);
                        var complete = _inputStream is not null && destination.Length >= DirectPayloadThreshold
                            ? await _input.ReadExactAsync(_inputStream, destination, ct).ConfigureAwait(false)
                            : await _input.ReadExactAsync(destination, ct).ConfigureAwait(false);
                        if (!complete)
                        {
                            ArrayPool<byte>.Shared.Return(payload);
                            break; // a torn WRITE is dropped, never half-written
                        }
                    }
                }
                if (error != NbdWire.NBD_SUCCESS)
                {
                    _logger.LogInformation("NBD client {Client}: invalid request: {Command}: {Message}", _client,
                        NbdWire.CommandName(request.Type), message);
                    await SendErrorAsync(request.Cookie, error, message!, ct).ConfigureAwait(false);
                    continue;
                }
                try
                {
                    await _slots.WaitAsync(ct).ConfigureAwait(false);
                }
                catch
                {
                    if (payload is not null)
                    {
                        ArrayPool<byte>.Shared.Return(payload);
                    }
                    throw;
                }
                _ = RunRequestAsync(request, payload);
            }
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or ObjectDisposedException or InvalidOperationException)
        {
            // Aborted (export removed, server stopped) or the connection broke.
        }
        finally
        {
            // Requests already started finish (their replies may fail to send) before the export may be released.
            for (var i = 0; i < MaxInFlight; i++)
            {
                await _slots.WaitAsync(CancellationToken.None).ConfigureAwait(false);
            }
        }
    }

    // ------------------------------------------------------------------ validate_request

    /// <summary>
    /// Checks a request against the protocol and what was negotiated, before anything acts on it:
    /// command, flags, read-only, size limit, range. Returns the NBD error and a log message, or success.
    /// </summary>
    internal (uint Error, string? Message) Validate(in NbdRequest request)
    {
        ushort allowed;
        switch (request.Type)
        {
            case NbdWire.NBD_CMD_READ:
                allowed = (ushort)(NbdWire.NBD_CMD_FLAG_FUA | (_structured ? NbdWire.NBD_CMD_FLAG_DF : 0));
                break;
            case NbdWire.NBD_CMD_WRITE:
            case NbdWire.NBD_CMD_TRIM:
            case NbdWire.NBD_CMD_FLUSH:
            case NbdWire.NBD_CMD_CACHE:
                allowed = NbdWire.NBD_CMD_FLAG_FUA;
                break;
            case NbdWire.NBD_CMD_WRITE_ZEROES:
                allowed = NbdWire.NBD_CMD_FLAG_FUA | NbdWire.NBD_CMD_FLAG_NO_HOLE | NbdWire.NBD_CMD_FLAG_FAST_ZERO;
                break;
            case NbdWire.NBD_CMD_BLOCK_STATUS:
                allowed = NbdWire.NBD_CMD_FLAG_FUA | NbdWire.NBD_CMD_FLAG_REQ_ONE;
                if (_contexts.Length == 0)
                {
                    return (NbdWire.NBD_EINVAL, "no metadata context was negotiated");
                }
                break;
            default:
                return (NbdWire.NBD_EINVAL, $"unsupported command {request.Type}");
        }
        if ((request.Flags & ~allowed) != 0)
        {
            return (NbdWire.NBD_EINVAL, $"unsupported flags 0x{request.Flags:x}");
        }
        var writes = request.Type is NbdWire.NBD_CMD_WRITE or NbdWire.NBD_CMD_TRIM or NbdWire.NBD_CMD_WRITE_ZEROES;
        if (writes && !_writable)
        {
            return (NbdWire.NBD_EPERM, "export is read-only");
        }
        if (request.Type is NbdWire.NBD_CMD_READ or NbdWire.NBD_CMD_WRITE && request.Length > NbdWire.NBD_MAX_BUFFER_SIZE)
        {
            return (NbdWire.NBD_EINVAL, $"length {request.Length} is larger than the maximum {NbdWire.NBD_MAX_BUFFER_SIZE}");
        }
        if (request.Type != NbdWire.NBD_CMD_FLUSH &&
            (request.Offset > (ulong)_size || request.Length > (ulong)_size - request.Offset))
        {
            var error = request.Type is NbdWire.NBD_CMD_WRITE or NbdWire.NBD_CMD_WRITE_ZEROES ? NbdWire.NBD_ENOSPC : NbdWire.NBD_EINVAL;
            return (error, $"operation past end of export: offset {request.Offset} length {request.Length} size {_size}");
        }
        if (request.Type == NbdWire.NBD_CMD_BLOCK_STATUS && request.Length == 0)
        {
            return (NbdWire.NBD_EINVAL, "zero-length block status");
        }
        return (NbdWire.NBD_SUCCESS, null);
    }

    // ------------------------------------------------------------------ handle_request

    private async Task RunRequestAsync(NbdRequest request, byte[]? payload)
    {
        var ct = _abort.Token;
        try
        {
            switch (request.Type)
            {
                case NbdWire.NBD_CMD_READ:
                    await ReadAsync(request, ct).ConfigureAwait(false);
                    break;
                case NbdWire.NBD_CMD_BLOCK_STATUS:
                    await BlockStatusAsync(request, ct).ConfigureAwait(false);
                    break;
                default:
                    var error = NbdWire.NBD_SUCCESS;
                    string? message = null;
                    try
                    {
                        await ExecuteAsync(request, payload, ct).ConfigureAwait(false);
                    }
#pragma warning disable CA1031 // every failure of the request becomes an NBD error for the client
                    catch (Exception e)
#pragma warning restore CA1031
                    {
                        error = NbdErrors.ToNbdError(e);
                        message = e.Message;
                        LogFailure(request, e);
                    }
                    if (error == NbdWire.NBD_SUCCESS)
                    {
                        await SendOkAsync(request.Cookie, ct).ConfigureAwait(false);
                    }
                    else
                    {
                        await SendErrorAsync(request.Cookie, error, message!, ct).ConfigureAwait(false);
                    }
                    break;
            }
        }
#pragma warning disable CA1031 // a reply that cannot be sent means the connection is gone: stop it, do not crash
        catch (Exception e)
#pragma warning restore CA1031
        {
            _logger.LogDebug(e, "NBD client {Client}: reply to {Command} not sent", _client, NbdWire.CommandName(request.Type));
            Abort();
        }
        finally
        {
            if (payload is not null)
            {
                ArrayPool<byte>.Shared.Return(payload);
            }
            _slots.Release();
        }
    }

    private async ValueTask ExecuteAsync(NbdRequest request, byte[]? payload, CancellationToken ct)
    {
        var offset = (long)request.Offset;
        var length = (long)request.Length;
        var fua = (request.Flags & NbdWire.NBD_CMD_FLAG_FUA) != 0 || _writethrough;
        switch (request.Type)
        {
            case NbdWire.NBD_CMD_WRITE:
                // A guest write: through the node's one I/O path, so observers (bitmaps, copy-before-write) see it.
                await _node.WriteAsync(offset, payload.AsMemory(0, (int)length), fua ? WriteFlags.Fua : WriteFlags.None, ct).ConfigureAwait(false);
                break;
            case NbdWire.NBD_CMD_WRITE_ZEROES:
                var flags = ((request.Flags & NbdWire.NBD_CMD_FLAG_NO_HOLE) != 0 ? WriteFlags.None : WriteFlags.MayUnmap) |
                            ((request.Flags & NbdWire.NBD_CMD_FLAG_FAST_ZERO) != 0 ? WriteFlags.NoFallback : WriteFlags.None);
                await _node.WriteZeroesAsync(offset, length, flags, ct).ConfigureAwait(false);
                if (fua && length > 0)
                {
                    await _node.FlushAsync(ct).ConfigureAwait(false);
                }
                break;
            case NbdWire.NBD_CMD_TRIM:
                await _node.DiscardAsync(offset, length, ct).ConfigureAwait(false);
                if (fua && length > 0)
                {
                    await _node.FlushAsync(ct).ConfigureAwait(false);
                }
                break;
            case NbdWire.NBD_CMD_FLUSH:
                await _node.FlushAsync(ct).ConfigureAwait(false);
                break;
            case NbdWire.NBD_CMD_CACHE:
                await CacheAsync(offset, length, ct).ConfigureAwait(false);
                break;
            default:
                throw new InvalidOperationException($"unvalidated command {request.Type}");
        }
    }

    /// <summary>NBD_CMD_CACHE: read the range so later reads are served from the host's cache; the data is dropped.</summary>
    private async ValueTask CacheAsync(long offset, long length, CancellationToken ct)
    {
        if (length == 0)
        {
            return;
        }
        var buffer = ArrayPool<byte>.Shared.Rent((int)Math.Min(length, CacheChunk));
        try
        {
            for (long done = 0; done < length;)
            {
                var n = (int)Math.Min(buffer.Length, length - done);
                await _node.ReadAsync(offset + done, buffer.AsMemory(0, n), ct).ConfigureAwait(false);
                done += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    private async ValueTask ReadAsync(NbdRequest request, CancellationToken ct)
    {
        var offset = (long)request.Offset;
        var length = (int)request.Length;
        if (!_structured)
        {
            // Simple reply: header and data in one buffer, one write.
            var buffer = ArrayPool<byte>.Shared.Rent(NbdSimpleReply.Size + length);
            try
            {
                var error = NbdWire.NBD_SUCCESS;
                try
                {
                    await _node.ReadAsync(offset, buffer.AsMemory(NbdSimpleReply.Size, length), ct).ConfigureAwait(false);
                }
#pragma warning disable CA1031
                catch (Exception e)
#pragma warning restore CA1031
                {
                    error = NbdErrors.ToNbdError(e);
                    LogFailure(request, e);
                }
                new NbdSimpleReply(error, request.Cookie).WriteTo(buffer);
                await SendAsync(ct, buffer.AsMemory(0, NbdSimpleReply.Size + (error == NbdWire.NBD_SUCCESS ? length : 0))).ConfigureAwait(false);
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
            return;
        }

        if (length == 0)
        {
            await SendOkAsync(request.Cookie, ct).ConfigureAwait(false);
            return;
        }
        // The data is read at ReadReplyPrefix so that the usual reply, one data chunk, is one contiguous write.
        var data = ArrayPool<byte>.Shared.Rent(ReadReplyPrefix + length);
        try
        {
            var dontFragment = (request.Flags & NbdWire.NBD_CMD_FLAG_DF) != 0;
            List<(long Offset, long Length, bool Hole)> extents = dontFragment
                ? [(offset, length, false)]
                : await MapForReadAsync(offset, length, ct).ConfigureAwait(false);
            try
            {
                foreach (var (o, n, hole) in extents)
                {
                    if (!hole)
                    {
                        await _node.ReadAsync(o, data.AsMemory(ReadReplyPrefix + (int)(o - offset), (int)n), ct).ConfigureAwait(false);
                    }
                }
            }
#pragma warning disable CA1031
            catch (Exception e)
#pragma warning restore CA1031
            {
                // Nothing was sent for this request yet: one error chunk is the whole reply.
                LogFailure(request, e);
                await SendErrorAsync(request.Cookie, NbdErrors.ToNbdError(e), e.Message, ct).ConfigureAwait(false);
                return;
            }

            if (extents.Count == 1 && !extents[0].Hole)
            {
                new NbdStructuredReplyHeader(NbdWire.NBD_REPLY_FLAG_DONE, NbdWire.NBD_REPLY_TYPE_OFFSET_DATA, request.Cookie, (uint)(8 + length))
                    .WriteTo(data);
                BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(NbdStructuredReplyHeader.Size), (ulong)offset);
                await SendAsync(ct, data.AsMemory(0, ReadReplyPrefix + length)).ConfigureAwait(false);
                return;
            }

            var parts = new List<ReadOnlyMemory<byte>>(extents.Count * 2);
            for (var i = 0; i < extents.Count; i++)
            {
                var (o, n, hole) = extents[i];
                var done = i == extents.Count - 1 ? NbdWire.NBD_REPLY_FLAG_DONE : (ushort)0;
                if (hole)
                {
                    var chunk = new byte[NbdStructuredReplyHeader.Size + NbdOffsetHole.Size];
                    new NbdStructuredReplyHeader(done, NbdWire.NBD_REPLY_TYPE_OFFSET_HOLE, request.Cookie, NbdOffsetHole.Size).WriteTo(chunk);
                    new NbdOffsetHole((ulong)o, (uint)n).WriteTo(chunk.AsSpan(NbdStructuredReplyHeader.Size));
                    parts.Add(chunk);
                }
                else
                {
                    var head = new byte[NbdStructuredReplyHeader.Size + 8];
                    new NbdStructuredReplyHeader(done, NbdWire.NBD_REPLY_TYPE_OFFSET_DATA, request.Cookie, (uint)(8 + n)).WriteTo(head);
                    BinaryPrimitives.WriteUInt64BigEndian(head.AsSpan(NbdStructuredReplyHeader.Size), (ulong)o);
                    parts.Add(head);
                    parts.Add(data.AsMemory(ReadReplyPrefix + (int)(o - offset), (int)n));
                }
            }
            await SendAsync(ct, [.. parts]).ConfigureAwait(false);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(data);
        }
    }

    /// <summary>Splits a READ into data and hole extents with block status; where status is unknown, it is data.</summary>
    private async ValueTask<List<(long Offset, long Length, bool Hole)>> MapForReadAsync(long offset, long length, CancellationToken ct)
    {
        var extents = new List<(long Offset, long Length, bool Hole)>();
        var pos = offset;
        var end = offset + length;
        try
        {
            while (pos < end && extents.Count < MaxReadExtents)
            {
                var status = await _node.GetBlockStatusAsync(pos, end - pos, ct).ConfigureAwait(false);
                var n = Math.Min(status.Length, end - pos);
                if (n <= 0)
                {
                    break;
                }
                Append(extents, pos, n, status.IsZero);
                pos += n;
            }
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            // Block status is an optimisation here; reading is the truth.
            _logger.LogDebug(e, "NBD client {Client}: block status for read failed", _client);
        }
        if (pos < end)
        {
            Append(extents, pos, end - pos, hole: false);
        }
        return extents;

        static void Append(List<(long Offset, long Length, bool Hole)> list, long o, long n, bool hole)
        {
            if (list.Count > 0 && list[^1].Hole == hole)
            {
                list[^1] = (list[^1].Offset, list[^1].Length + n, hole);
            }
            else
            {
                list.Add((o, n, hole));
            }
        }
    }

    private async ValueTask BlockStatusAsync(NbdRequest request, CancellationToken ct)
    {
        var offset = (long)request.Offset;
        var length = (long)request.Length;
        var maxExtents = (request.Flags & NbdWire.NBD_CMD_FLAG_REQ_ONE) != 0 ? 1 : MaxExtents;
        var chunks = new List<ReadOnlyMemory<byte>>(_contexts.Length);
        for (var i = 0; i < _contexts.Length; i++)
        {
            var extents = new List<MetaExtent>();
            try
            {
                await _contexts[i].GetExtentsAsync(offset, length, maxExtents, extents, ct).ConfigureAwait(false);
            }
#pragma warning disable CA1031
            catch (Exception e)
#pragma warning restore CA1031
            {
                LogFailure(request, e);
                await SendErrorAsync(request.Cookie, NbdErrors.ToNbdError(e), e.Message, ct).ConfigureAwait(false);
                return;
            }
            chunks.Add(BlockStatusChunk(request.Cookie, _contextIds[i], extents, length, maxExtents, last: i == _contexts.Length - 1));
        }
        await SendAsync(ct, [.. chunks]).ConfigureAwait(false);
    }

    /// <summary>One NBD_REPLY_TYPE_BLOCK_STATUS chunk; extents are clipped to the request and never empty.</summary>
    internal static byte[] BlockStatusChunk(ulong cookie, uint contextId, List<MetaExtent> extents, long length, int maxExtents, bool last)
    {
        var descriptors = new List<NbdBlockDescriptor>(Math.Min(extents.Count, maxExtents));
        long covered = 0;
        foreach (var e in extents)
        {
            if (descriptors.Count == maxExtents || covered >= length)
            {
                break;
            }
            var n = Math.Min(e.Length, length - covered);
            if (n <= 0)
            {
                continue;
            }
            descriptors.Add(new NbdBlockDescriptor((uint)n, e.Flags));
            covered += n;
        }
        if (descriptors.Count == 0)
        {
            // A context that said nothing: report the range with no flags set rather than an invalid empty chunk.
            descriptors.Add(new NbdBlockDescriptor((uint)length, 0));
        }
        var payloadLength = 4 + descriptors.Count * NbdBlockDescriptor.Size;
        var chunk = new byte[NbdStructuredReplyHeader.Size + payloadLength];
        new NbdStructuredReplyHeader(last ? NbdWire.NBD_REPLY_FLAG_DONE : (ushort)0, NbdWire.NBD_REPLY_TYPE_BLOCK_STATUS, cookie, (uint)payloadLength)
            .WriteTo(chunk);
        BinaryPrimitives.WriteUInt32BigEndian(chunk.AsSpan(NbdStructuredReplyHeader.Size), contextId);
        for (var i = 0; i < descriptors.Count; i++)
        {
            descriptors[i].WriteTo(chunk.AsSpan(NbdStructuredReplyHeader.Size + 4 + i * NbdBlockDescriptor.Size));
        }
        return chunk;
    }

    // ------------------------------------------------------------------ replies

    private ValueTask SendOkAsync(ulong cookie, CancellationToken ct)
    {
        byte[] reply;
        if (_structured)
        {
            reply = new byte[NbdStructuredReplyHeader.Size];
            new NbdStructuredReplyHeader(NbdWire.NBD_REPLY_FLAG_DONE, NbdWire.NBD_REPLY_TYPE_NONE, cookie, 0).WriteTo(reply);
        }
        else
        {
            reply = new byte[NbdSimpleReply.Size];
            new NbdSimpleReply(NbdWire.NBD_SUCCESS, cookie).WriteTo(reply);
        }
        return SendAsync(ct, reply);
    }

    /// <summary>An error reply: a simple reply, or with structured replies one NBD_REPLY_TYPE_ERROR chunk carrying a message.</summary>
    private ValueTask SendErrorAsync(ulong cookie, uint error, string message, CancellationToken ct)
    {
        if (!_structured)
        {
            var reply = new byte[NbdSimpleReply.Size];
            new NbdSimpleReply(error, cookie).WriteTo(reply);
            return SendAsync(ct, reply);
        }
        var text = Encoding.UTF8.GetBytes(message);
        if (text.Length > 1024)
        {
            text = text[..1024];
        }
        var chunk = new byte[NbdStructuredReplyHeader.Size + 6 + text.Length];
        new NbdStructuredReplyHeader(NbdWire.NBD_REPLY_FLAG_DONE, NbdWire.NBD_REPLY_TYPE_ERROR, cookie, (uint)(6 + text.Length)).WriteTo(chunk);
        BinaryPrimitives.WriteUInt32BigEndian(chunk.AsSpan(NbdStructuredReplyHeader.Size), error);
        BinaryPrimitives.WriteUInt16BigEndian(chunk.AsSpan(NbdStructuredReplyHeader.Size + 4), (ushort)text.Length);
        text.CopyTo(chunk, NbdStructuredReplyHeader.Size + 6);
        return SendAsync(ct, chunk);
    }

    /// <summary>Writes the parts of one reply back to back; no other reply can come between them.</summary>
    private async ValueTask SendAsync(CancellationToken ct, params ReadOnlyMemory<byte>[] parts)
    {
        await _writeLock.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            foreach (var p in parts)
            {
                await _output.WriteAsync(p, ct).ConfigureAwait(false);
            }
            await _output.FlushAsync(ct).ConfigureAwait(false);
        }
        finally
        {
            _writeLock.Release();
        }
    }

    public void Dispose()
    {
        _writeLock.Dispose();
        _slots.Dispose();
        _abort.Dispose();
    }

    private void Abort()
    {
        try
        {
            _abort.Cancel();
        }
        catch (ObjectDisposedException)
        {
            // Already finished.
        }
    }

    private void LogFailure(NbdRequest request, Exception e) =>
        _logger.LogWarning("NBD client {Client}: {Command} offset {Offset} length {Length} failed: {Error}", _client,
            NbdWire.CommandName(request.Type), request.Offset, request.Length, e.Message);
}
