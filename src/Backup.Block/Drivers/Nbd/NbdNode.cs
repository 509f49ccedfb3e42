using System.Buffers;
using Backup.Nbd.Protocol;

namespace Backup.Block.Drivers.Nbd;

/// <summary>What the nbd driver was asked to connect to, and how to behave when the server goes away.</summary>
public sealed record NbdClientOptions
{
    public required NbdClientAddress Address { get; init; }
    public string Export { get; init; } = "";

    /// <summary>The metadata context block status reads: base:allocation, or x-dirty-bitmap's.</summary>
    public string MetaContext { get; init; } = NbdWire.BASE_ALLOCATION;

    /// <summary>How long requests wait for a reconnection after the server went away (0: fail at once).</summary>
    public TimeSpan ReconnectDelay { get; init; }

    /// <summary>How long the first connection may keep being retried (0: one attempt).</summary>
    public TimeSpan OpenTimeout { get; init; }

    public INbdClientTls? Tls { get; init; }
}

/// <summary>
/// A node whose data an NBD server holds (QEMU's block/nbd.c). Every request goes to the server over one
/// connection with many requests in flight; large requests are split at the server's maximum payload,
/// unaligned ones widened to its minimum block size.
/// <para><b>Connection loss</b>, QEMU's semantics: when the server goes away, requests fail with EIO at once,
/// unless <c>reconnect-delay</c> is set: then for that long requests (those in flight included) wait while
/// the driver reconnects, and go on over the new connection, or fail with EIO once the delay is over. The
/// driver keeps reconnecting in the background either way (1 s, doubling to 16 s, as QEMU), so a server
/// that comes back later serves new requests. A reply that breaks the protocol closes the connection for
/// good (QEMU's QUIT state): it is logged, and every request fails with EIO from then on.</para>
/// </summary>
public sealed class NbdNode : BlockNode
{
    private enum State
    {
        Connected,
        /// <summary>Lost, within reconnect-delay: requests wait.</summary>
        Waiting,
        /// <summary>Lost, past the delay (or none): requests fail at once while reconnection goes on.</summary>
        Failing,
        /// <summary>A protocol error or close: requests fail for good.</summary>
        Quit,
    }

    private readonly NbdClientOptions _options;
    private readonly Lock _lock = new();
    private readonly CancellationTokenSource _closing = new();
    private readonly SemaphoreSlim _unalignedLock = new(1, 1);
    private NbdClientConnection _connection;
    private State _state = State.Connected;
    private TaskCompletionSource _stateChanged = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private Task _reconnecting = Task.CompletedTask;

    private NbdNode(NodeContext context, NbdClientOptions options, NbdClientConnection connection, string filename)
        : base(context)
    {
        _options = options;
        _connection = connection;
        Length = connection.Info.Size;
        Filename = filename;
        Watch(connection);
    }

    /// <summary>Connects (retrying for up to open-timeout) and opens the node.</summary>
    public static async ValueTask<NbdNode> OpenAsync(NodeContext context, NbdClientOptions options, string filename,
        CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        ArgumentNullException.ThrowIfNull(options);
        var deadline = DateTime.UtcNow + options.OpenTimeout;
        var delay = TimeSpan.FromSeconds(1);
        while (true)
        {
            try
            {
                var connection = await ConnectAsync(options, cancellationToken).ConfigureAwait(false);
                if (connection.Info.Has(NbdWire.NBD_FLAG_READ_ONLY) && !context.ReadOnly)
                {
                    await connection.DisposeAsync().ConfigureAwait(false);
                    throw new BlockException("NBD export is read-only");
                }
                return new NbdNode(context, options, connection, filename);
            }
            catch (BlockException) when (DateTime.UtcNow + delay < deadline)
            {
                await Task.Delay(delay, cancellationToken).ConfigureAwait(false);
                delay = TimeSpan.FromTicks(Math.Min(delay.Ticks * 2, TimeSpan.FromSeconds(16).Ticks));
            }
        }
    }

    private static async ValueTask<NbdClientConnection> ConnectAsync(NbdClientOptions options, CancellationToken cancellationToken)
    {
        var socket = await options.Address.ConnectAsync(cancellationToken).ConfigureAwait(false);
        Stream stream = new System.Net.Sockets.NetworkStream(socket, ownsSocket: true);
        try
        {
            (var info, stream) = await NbdClientHandshake.RunAsync(stream, options.Export, options.MetaContext, options.Tls, cancellationToken)
                .ConfigureAwait(false);
            return new NbdClientConnection(stream, info, socket);
        }
        catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException or EndOfStreamException)
        {
            await stream.DisposeAsync().ConfigureAwait(false);
            throw new BlockException($"Failed to read initial magic: {e.Message}", e);
        }
        catch
        {
            await stream.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    public override string DriverName => "nbd";

    public override string Filename { get; }

    public override long Length { get; }

    public NbdExportInfo ExportInfo => Volatile.Read(ref _connection).Info;

    // ------------------------------------------------------------------ connection state

    private void Watch(NbdClientConnection connection) =>
        _ = connection.Closed.ContinueWith(t => OnConnectionClosed(connection, t.Result), CancellationToken.None,
            TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

    private void OnConnectionClosed(NbdClientConnection connection, Exception? reason)
    {
        lock (_lock)
        {
            if (!ReferenceEquals(connection, _connection) || _state != State.Connected)
            {
                return;
            }
            if (_closing.IsCancellationRequested)
            {
                SetState(State.Quit);
                return;
            }
            if (reason is NbdProtocolException)
            {
                Log($"protocol error, closing the connection: {reason.Message}");
                SetState(State.Quit);
                return;
            }
            Log($"connection to '{_options.Address.Display}' lost: {reason?.Message ?? "closed"}" +
                (_options.ReconnectDelay > TimeSpan.Zero ? $"; reconnecting, requests wait up to {_options.ReconnectDelay.TotalSeconds} s" : "; reconnecting"));
            SetState(_options.ReconnectDelay > TimeSpan.Zero ? State.Waiting : State.Failing);
            _reconnecting = Task.Run(ReconnectAsync);
        }
    }

    private void SetState(State state)
    {
        _state = state;
        var old = _stateChanged;
        _stateChanged = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        old.TrySetResult();
    }

    private async Task ReconnectAsync()
    {
        var token = _closing.Token;
        var delayOver = _options.ReconnectDelay > TimeSpan.Zero
            ? Task.Delay(_options.ReconnectDelay, token).ContinueWith(_ =>
            {
                lock (_lock)
                {
                    if (_state == State.Waiting)
                    {
                        SetState(State.Failing);
                    }
                }
            }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default)
            : Task.CompletedTask;
        var backoff = TimeSpan.FromSeconds(1);
        while (!token.IsCancellationRequested)
        {
            try
            {
                var connection = await ConnectAsync(_options, token).ConfigureAwait(false);
                if (connection.Info.Size != Length)
                {
                    await connection.DisposeAsync().ConfigureAwait(false);
                    throw new BlockException($"server size changed from {Length} to {connection.Info.Size}");
                }
                bool closed;
                lock (_lock)
                {
                    closed = _state == State.Quit;
                    if (!closed)
                    {
                        _connection = connection;
                        SetState(State.Connected);
                        Watch(connection);
                    }
                }
                if (closed)
                {
                    await connection.DisposeAsync().ConfigureAwait(false);
                    return;
                }
                Log($"reconnected to '{_options.Address.Display}'");
                return;
            }
            catch (BlockException)
            {
            }
            catch (OperationCanceledException)
            {
                return;
            }
            try
            {
                await Task.Delay(backoff, token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            backoff = TimeSpan.FromTicks(Math.Min(backoff.Ticks * 2, TimeSpan.FromSeconds(16).Ticks));
        }
        GC.KeepAlive(delayOver);
    }

    /// <summary>The connection to send on, waiting while a reconnection is due; EIO when there is none.</summary>
    private ValueTask<NbdClientConnection> GetConnectionAsync(CancellationToken cancellationToken)
    {
        lock (_lock)
        {
            if (_state == State.Connected)
            {
                return ValueTask.FromResult(_connection);
            }
        }
        return WaitForConnectionAsync(cancellationToken);
    }

    private async ValueTask<NbdClientConnection> WaitForConnectionAsync(CancellationToken cancellationToken)
    {
        while (true)
        {
            Task changed;
            lock (_lock)
            {
                switch (_state)
                {
                    case State.Connected:
                        return _connection;
                    case State.Waiting:
                        changed = _stateChanged.Task;
                        break;
                    default:
                        throw Posix.LibC.ErrnoException(5);
                }
            }
            await changed.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>One request, retried on a new connection while reconnect-delay lets requests wait.</summary>
    private async ValueTask<NbdReply> SendAsync(ushort type, ushort flags, long offset, long length,
        ReadOnlyMemory<byte> write, Memory<byte> read, CancellationToken cancellationToken)
    {
        while (true)
        {
            var connection = await GetConnectionAsync(cancellationToken).ConfigureAwait(false);
            var reply = await connection.RequestAsync(type, flags, (ulong)offset, (uint)length, write, read, cancellationToken).ConfigureAwait(false);
            if (reply.Outcome == NbdReplyOutcome.Replied)
            {
                if (reply.Error != 0 && type != NbdWire.NBD_CMD_BLOCK_STATUS)
                {
                    throw Posix.LibC.ErrnoException(ToErrno(reply.Error));
                }
                return reply;
            }
            // The reader saw the connection end; make sure the state moved before asking it again.
            OnConnectionClosed(connection, await connection.Closed.ConfigureAwait(false));
        }
    }

    /// <summary>QEMU's nbd_errno_to_system_errno: NBD's values are Linux's; unknown ones become EINVAL.</summary>
    private static int ToErrno(uint error) => error switch
    {
        NbdWire.NBD_EPERM or NbdWire.NBD_EIO or NbdWire.NBD_ENOMEM or NbdWire.NBD_ENOSPC or NbdWire.NBD_EOVERFLOW
            or NbdWire.NBD_ENOTSUP or NbdWire.NBD_ESHUTDOWN => (int)error,
        _ => 22,
    };

    private void Log(string message) => Console.Error.WriteLine($"nbd node '{NodeName}': {message}");

    // ------------------------------------------------------------------ I/O

    private int MinBlock => (int)ExportInfo.MinimumBlockSize;

    private int MaxPayload
    {
        get
        {
            var info = ExportInfo;
            var max = (int)Math.Min(info.MaximumPayload, (uint)NbdWire.NBD_MAX_BUFFER_SIZE);
            return max - max % (int)info.MinimumBlockSize;
        }
    }

    /// <summary>Largest write-zeroes, trim or block-status length in one request (QEMU: INT_MAX aligned down).</summary>
    private long MaxRange => int.MaxValue - int.MaxValue % MinBlock;

    private bool IsAligned(long offset, long length) => MinBlock == 1 || (offset % MinBlock == 0 && (length % MinBlock == 0 || offset + length == Length));

    protected override async ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        if (!IsAligned(offset, buffer.Length))
        {
            await ReadUnalignedAsync(offset, buffer, cancellationToken).ConfigureAwait(false);
            return;
        }
        var max = MaxPayload;
        for (var done = 0; done < buffer.Length;)
        {
            var n = Math.Min(max, buffer.Length - done);
            await SendAsync(NbdWire.NBD_CMD_READ, 0, offset + done, n, default, buffer.Slice(done, n), cancellationToken).ConfigureAwait(false);
            done += n;
        }
    }

    private async ValueTask ReadUnalignedAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        var (start, length) = Widen(offset, buffer.Length);
        var bounce = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            await ReadCoreAsync(start, bounce.AsMemory(0, length), cancellationToken).ConfigureAwait(false);
            bounce.AsMemory((int)(offset - start), buffer.Length).CopyTo(buffer);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(bounce);
        }
    }

    private (long Start, int Length) Widen(long offset, int length)
    {
        var start = offset - offset % MinBlock;
        var end = Math.Min(Length, (offset + length + MinBlock - 1) / MinBlock * MinBlock);
        return (start, checked((int)(end - start)));
    }

    protected override async ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        if (!IsAligned(offset, data.Length))
        {
            await WriteUnalignedAsync(offset, data, flags, cancellationToken).ConfigureAwait(false);
            return;
        }
        var (fua, flushAfter) = Fua(flags);
        var max = MaxPayload;
        for (var done = 0; done < data.Length;)
        {
            var n = Math.Min(max, data.Length - done);
            await SendAsync(NbdWire.NBD_CMD_WRITE, fua, offset + done, n, data.Slice(done, n), default, cancellationToken).ConfigureAwait(false);
            done += n;
        }
        if (flushAfter)
        {
            await FlushCoreAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>FUA on the wire when the server takes it, else a flush after the write (QEMU's block layer does the same).</summary>
    private (ushort Flag, bool FlushAfter) Fua(WriteFlags flags) =>
        (flags & WriteFlags.Fua) == 0 ? ((ushort)0, false)
        : ExportInfo.Has(NbdWire.NBD_FLAG_SEND_FUA) ? (NbdWire.NBD_CMD_FLAG_FUA, false)
        : ((ushort)0, true);

    /// <summary>
    /// A write not aligned to the server's minimum block: read the blocks around it, change them, write them
    /// back. Such writes are serialized among themselves (backups write whole clusters and never get here).
    /// </summary>
    private async ValueTask WriteUnalignedAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        var (start, length) = Widen(offset, data.Length);
        var bounce = ArrayPool<byte>.Shared.Rent(length);
        await _unalignedLock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await ReadCoreAsync(start, bounce.AsMemory(0, length), cancellationToken).ConfigureAwait(false);
            data.CopyTo(bounce.AsMemory((int)(offset - start)));
            await WriteCoreAsync(start, bounce.AsMemory(0, length), flags, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _unalignedLock.Release();
            ArrayPool<byte>.Shared.Return(bounce);
        }
    }

    protected override async ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        var info = ExportInfo;
        var noFallback = (flags & WriteFlags.NoFallback) != 0;
        if (!info.Has(NbdWire.NBD_FLAG_SEND_WRITE_ZEROES) || (noFallback && !info.Has(NbdWire.NBD_FLAG_SEND_FAST_ZERO)))
        {
            if (noFallback)
            {
                throw Posix.LibC.ErrnoException(95);
            }
            await WriteZeroBuffersAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);
            return;
        }
        // Unaligned head and tail become zero-buffer writes; the aligned middle is one request per MaxRange.
        var alignedStart = (offset + MinBlock - 1) / MinBlock * MinBlock;
        var alignedEnd = offset + length == Length ? Length : (offset + length) / MinBlock * MinBlock;
        if (alignedStart >= alignedEnd)
        {
            await WriteZeroBuffersAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);
            return;
        }
        if (alignedStart > offset)
        {
            await WriteZeroBuffersAsync(offset, alignedStart - offset, flags, cancellationToken).ConfigureAwait(false);
        }
        var wireFlags = (ushort)(((flags & WriteFlags.MayUnmap) == 0 ? NbdWire.NBD_CMD_FLAG_NO_HOLE : 0) |
            (noFallback ? NbdWire.NBD_CMD_FLAG_FAST_ZERO : 0));
        var (fua, flushAfter) = Fua(flags);
        wireFlags |= fua;
        for (var at = alignedStart; at < alignedEnd;)
        {
            var n = Math.Min(MaxRange, alignedEnd - at);
            await SendAsync(NbdWire.NBD_CMD_WRITE_ZEROES, wireFlags, at, n, default, default, cancellationToken).ConfigureAwait(false);
            at += n;
        }
        if (alignedEnd < offset + length)
        {
            await WriteZeroBuffersAsync(alignedEnd, offset + length - alignedEnd, flags, cancellationToken).ConfigureAwait(false);
        }
        if (flushAfter)
        {
            await FlushCoreAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    private async ValueTask WriteZeroBuffersAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        var chunk = (int)Math.Min(length, 1 << 20);
        var zeros = ArrayPool<byte>.Shared.Rent(chunk);
        try
        {
            Array.Clear(zeros, 0, chunk);
            for (long done = 0; done < length;)
            {
                var n = (int)Math.Min(chunk, length - done);
                await WriteCoreAsync(offset + done, zeros.AsMemory(0, n), flags & WriteFlags.Fua, cancellationToken).ConfigureAwait(false);
                done += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(zeros);
        }
    }

    protected override async ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        if (!ExportInfo.Has(NbdWire.NBD_FLAG_SEND_TRIM))
        {
            return;
        }
        // A discard is a hint: only the whole blocks inside the range go to the server.
        var start = (offset + MinBlock - 1) / MinBlock * MinBlock;
        var end = offset + length == Length ? Length : (offset + length) / MinBlock * MinBlock;
        for (var at = start; at < end;)
        {
            var n = Math.Min(MaxRange, end - at);
            await SendAsync(NbdWire.NBD_CMD_TRIM, 0, at, n, default, default, cancellationToken).ConfigureAwait(false);
            at += n;
        }
    }

    protected override async ValueTask FlushCoreAsync(CancellationToken cancellationToken)
    {
        if (ExportInfo.Has(NbdWire.NBD_FLAG_SEND_FLUSH))
        {
            await SendAsync(NbdWire.NBD_CMD_FLUSH, 0, 0, 0, default, default, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// One extent of the negotiated context (QEMU's nbd_client_co_block_status with REQ_ONE). The flags map
    /// as QEMU maps them, for base:allocation and for an x-dirty-bitmap context alike: bit 0 (HOLE, or
    /// DIRTY) clear means data, bit 1 (ZERO) means zeros. So with x-dirty-bitmap a dirty extent reads as a
    /// hole and a clean one as data, as qemu-img map shows it through QEMU. Without a context everything is data.
    /// </summary>
    protected override async ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        var info = ExportInfo;
        if (info.MetaContextId is null)
        {
            return new BlockStatus(length, BlockStatusFlags.Data | BlockStatusFlags.Allocated);
        }
        var start = offset - offset % MinBlock;
        var askLength = Math.Min(MaxRange, Math.Min(Length - start, length + (offset - start)));
        var reply = await SendAsync(NbdWire.NBD_CMD_BLOCK_STATUS, NbdWire.NBD_CMD_FLAG_REQ_ONE, start, askLength, default, default, cancellationToken)
            .ConfigureAwait(false);
        if (reply.Error != 0)
        {
            // QEMU treats a failed status query as "all data" rather than failing the caller.
            return new BlockStatus(length, BlockStatusFlags.Data | BlockStatusFlags.Allocated);
        }
        var extentEnd = start + reply.ExtentLength;
        var n = Math.Min(length, extentEnd - offset);
        if (n <= 0)
        {
            return new BlockStatus(Math.Min(length, MinBlock - offset % MinBlock), BlockStatusFlags.Data | BlockStatusFlags.Allocated);
        }
        var flags = BlockStatusFlags.None;
        if ((reply.ExtentFlags & NbdWire.NBD_STATE_HOLE) == 0)
        {
            flags |= BlockStatusFlags.Data;
        }
        if ((reply.ExtentFlags & NbdWire.NBD_STATE_ZERO) != 0)
        {
            flags |= BlockStatusFlags.Zero;
        }
        var allocated = flags != BlockStatusFlags.None;
        return new BlockStatus(n, allocated ? flags | BlockStatusFlags.Allocated : flags, allocated ? 1 : 0);
    }

    /// <summary>
    /// An export has the size its server gives it. As QEMU's nbd_co_truncate (callers here never ask for an
    /// exact size): growing fails, a smaller size succeeds and changes nothing, so a format can be laid on an
    /// export that is larger than it needs.
    /// </summary>
    protected override ValueTask TruncateCoreAsync(long length, CancellationToken cancellationToken) =>
        length > Length ? throw new BlockException("Cannot grow NBD nodes") : ValueTask.CompletedTask;

    /// <summary>QSD reports only size, name and format for nbd nodes (no bdrv_get_info).</summary>
    public override ImageInfo GetImageInfo() => new()
    {
        Filename = Filename,
        Format = "nbd",
        VirtualSize = Length,
        DirtyFlag = null,
    };

    public override async ValueTask CloseAsync()
    {
        NbdClientConnection connection;
        lock (_lock)
        {
            _closing.Cancel();
            connection = _connection;
            SetState(State.Quit);
        }
        await connection.DisposeAsync().ConfigureAwait(false);
        try
        {
            await _reconnecting.ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
        }
    }
}
