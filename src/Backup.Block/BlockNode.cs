using System.Runtime.CompilerServices;
using Backup.Block.Permissions;

namespace Backup.Block;

/// <summary>
/// One node of the block graph: a protocol driver (file), a format driver (raw, qcow2) or a filter.
/// Every read, write, zero and discard of every node passes through the public methods here, which
/// check the request, run the node's write observers (dirty bitmaps, copy-before-write) and then call
/// the driver's Core method. Drivers never skip this path: they reach their children through the
/// children's public methods too, so observers attached at any depth see the writes.
/// </summary>
public abstract class BlockNode : IAsyncDisposable
{
    private IWriteObserver[] _observers = [];
    private readonly Lock _usersLock = new();
    private readonly List<(string Reason, bool JobTarget)> _users = [];
    private long _inFlight;

    protected BlockNode(NodeContext context)
    {
        ArgumentNullException.ThrowIfNull(context);
        NodeName = context.NodeName;
        IsImplicitName = context.IsImplicitName;
        ReadOnly = context.ReadOnly;
        ForceShare = context.ForceShare;
        CacheDirect = context.CacheDirect;
        CacheNoFlush = context.CacheNoFlush;
        Discard = context.Discard;
        DetectZeroes = context.DetectZeroes;
        Graph = context.Graph;
    }

    /// <summary>The graph the node belongs to (where its users and edges are recorded).</summary>
    public BlockGraph Graph { get; }

    public string NodeName { get; }

    /// <summary>True for nodes named by the daemon (<c>#blockNNN</c>) because the user gave no node-name.</summary>
    public bool IsImplicitName { get; }

    /// <summary>The driver name as QMP reports it in <c>drv</c>.</summary>
    public abstract string DriverName { get; }

    public bool ReadOnly { get; }

    /// <summary>
    /// QEMU's force-share: every parent edge shares all permissions with others, so the node refuses
    /// nobody (its file takes no lock bytes of the unshared range). Only with read-only.
    /// </summary>
    public bool ForceShare { get; }

    public bool CacheDirect { get; }

    public bool CacheNoFlush { get; }

    public DiscardMode Discard { get; }

    public DetectZeroesMode DetectZeroes { get; }

    /// <summary>The virtual size in bytes: what a reader of this node sees.</summary>
    public abstract long Length { get; }

    /// <summary>
    /// A filter shows its file child's data unchanged (QEMU's is_filter); queries count that child as
    /// the next layer of the backing chain.
    /// </summary>
    public virtual bool IsFilter => false;

    /// <summary>Children this node holds, by role (file, backing, ...).</summary>
    public virtual IReadOnlyList<BlockChild> Children => [];

    /// <summary>The file name reported by query-named-block-nodes (<c>file</c>, <c>image.filename</c>).</summary>
    public abstract string Filename { get; }

    /// <summary>Requests currently inside the driver; used to wait for quiescence.</summary>
    public long InFlightRequests => Interlocked.Read(ref _inFlight);

    // ------------------------------------------------------------------ the I/O path

    public ValueTask ReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken = default) =>
        ReadAsync(offset, buffer, atTheDoor: true, cancellationToken);

    /// <summary>
    /// A read that requests already in flight may depend on: a block copy saving old data before a guest
    /// write goes on, or a job's copy whose claim a guest write waits for. It passes the door of a quiesced
    /// node, as QEMU's node-level requests pass a drained section (only new requests from devices and
    /// exports are held): held there, it would wait for a quiescence that waits for the write that waits
    /// for it. It counts as in flight, so a quiescer still waits for it to end.
    /// </summary>
    public ValueTask ReadForCopyAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken = default) =>
        ReadAsync(offset, buffer, atTheDoor: false, cancellationToken);

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ReadAsync(long offset, Memory<byte> buffer, bool atTheDoor, CancellationToken cancellationToken)
    {
        CheckRange(offset, buffer.Length);
        if (buffer.IsEmpty)
        {
            return;
        }
        if (atTheDoor)
        {
            await EnterAsync().ConfigureAwait(false);
        }
        else
        {
            Interlocked.Increment(ref _inFlight);
        }
        try
        {
            await ReadCoreAsync(offset, buffer, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Interlocked.Decrement(ref _inFlight);
        }
    }

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags = WriteFlags.None,
        CancellationToken cancellationToken = default)
    {
        CheckWritable();
        CheckRange(offset, data.Length);
        if (data.IsEmpty)
        {
            return ValueTask.CompletedTask;
        }
        if (DetectZeroes != DetectZeroesMode.Off && data.Span.IndexOfAnyExcept((byte)0) < 0)
        {
            var zflags = flags | (DetectZeroes == DetectZeroesMode.Unmap ? WriteFlags.MayUnmap : WriteFlags.None);
            return WriteZeroesAsync(offset, data.Length, zflags, cancellationToken);
        }
        return ModifyAsync(offset, data.Length, WriteKind.Write, BlkdebugEvent.Pwritev, (data, flags),
            static (node, offset, s, ct) => node.WriteCoreAsync(offset, s.data, s.flags, ct), cancellationToken);
    }

    public ValueTask WriteZeroesAsync(long offset, long length, WriteFlags flags = WriteFlags.None,
        CancellationToken cancellationToken = default)
    {
        CheckWritable();
        CheckRange(offset, length);
        if (length == 0)
        {
            return ValueTask.CompletedTask;
        }
        if (Discard == DiscardMode.Ignore)
        {
            // QEMU only lets write-zeroes unmap on nodes opened with discard=unmap.
            flags &= ~WriteFlags.MayUnmap;
        }
        return ModifyAsync(offset, length, WriteKind.WriteZeroes, BlkdebugEvent.PwritevZero, (length, flags),
            static (node, offset, s, ct) => node.WriteZeroesCoreAsync(offset, s.length, s.flags, ct), cancellationToken);
    }

    /// <summary>
    /// True when the node can store data compressed (QEMU's bdrv_supports_compressed_writes): qcow2.
    /// </summary>
    public virtual bool SupportsCompressedWrites => false;

    /// <summary>
    /// Writes whole clusters compressed where that saves space (QEMU's BDRV_REQ_WRITE_COMPRESSED), through
    /// the same observers as any write. The driver decides per cluster; the offset must be cluster-aligned
    /// and the length whole clusters, except for the last cluster of the image.
    /// </summary>
    public ValueTask WriteCompressedAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default)
    {
        CheckWritable();
        CheckRange(offset, data.Length);
        if (!SupportsCompressedWrites)
        {
            throw new BlockException($"{this} does not support compressed writes");
        }
        if (data.IsEmpty)
        {
            return ValueTask.CompletedTask;
        }
        return ModifyAsync(offset, data.Length, WriteKind.Write, null, data,
            static (node, offset, d, ct) => node.WriteCompressedCoreAsync(offset, d, ct), cancellationToken);
    }

    /// <summary>
    /// Discards a range (a hint: the data becomes unspecified). Ignored on nodes opened with
    /// <c>discard=ignore</c>, the default, as in QEMU; then it changes nothing and dirties nothing.
    /// </summary>
    public ValueTask DiscardAsync(long offset, long length, CancellationToken cancellationToken = default)
    {
        CheckWritable();
        CheckRange(offset, length);
        if (length == 0 || Discard == DiscardMode.Ignore)
        {
            return ValueTask.CompletedTask;
        }
        return ModifyAsync(offset, length, WriteKind.Discard, null, length,
            static (node, offset, length, ct) => node.DiscardCoreAsync(offset, length, ct), cancellationToken);
    }

    /// <summary>
    /// The common path of every request that changes data: observers before (copy-before-write), the
    /// driver, observers after (dirty bitmaps). A request counts as in flight until its observers have
    /// seen it complete, so waiting for quiescence also waits for the bitmap marks. The state is passed
    /// through a generic parameter and the driver call is a static lambda: no allocation per request.
    /// Writes raise QEMU's io.c blkdebug events on this node: <paramref name="startEvent"/> (pwritev,
    /// pwritev_zero; none for compressed writes) before the driver, pwritev_done after it, even when it
    /// failed; discards raise none.
    /// </summary>
    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask ModifyAsync<TState>(long offset, long length, WriteKind kind, BlkdebugEvent? startEvent, TState state,
        Func<BlockNode, long, TState, CancellationToken, ValueTask> core, CancellationToken cancellationToken)
    {
        await EnterAsync().ConfigureAwait(false);
        var observers = Volatile.Read(ref _observers);
        try
        {
            foreach (var o in observers)
            {
                await o.BeforeWriteAsync(this, offset, length, kind, cancellationToken).ConfigureAwait(false);
            }
            if (kind == WriteKind.Discard)
            {
                await core(this, offset, state, cancellationToken).ConfigureAwait(false);
            }
            else
            {
                if (startEvent is { } ev)
                {
                    await OnDebugEventAsync(ev).ConfigureAwait(false);
                }
                try
                {
                    await core(this, offset, state, cancellationToken).ConfigureAwait(false);
                }
                finally
                {
                    await OnDebugEventAsync(BlkdebugEvent.PwritevDone).ConfigureAwait(false);
                }
            }
            if (_writtenSinceFlush == 0)
            {
                _writtenSinceFlush = 1;
            }
            foreach (var o in observers)
            {
                o.AfterWrite(this, offset, length, kind);
            }
        }
        finally
        {
            Interlocked.Decrement(ref _inFlight);
        }
    }

    // ------------------------------------------------------------------ quiescing

    private TaskCompletionSource? _quiesced;

    /// <summary>
    /// Counts a request in, or waits while the node is quiesced. The count is raised before the gate is
    /// read, and the quiescer closes the gate before it reads the count, so no request slips past.
    /// </summary>
    private ValueTask EnterAsync()
    {
        Interlocked.Increment(ref _inFlight);
        var gate = Volatile.Read(ref _quiesced);
        return gate is null ? ValueTask.CompletedTask : WaitAndEnterAsync(gate);
    }

    private async ValueTask WaitAndEnterAsync(TaskCompletionSource? gate)
    {
        while (gate is not null)
        {
            Interlocked.Decrement(ref _inFlight);
            await gate.Task.ConfigureAwait(false);
            Interlocked.Increment(ref _inFlight);
            gate = Volatile.Read(ref _quiesced);
        }
    }

    /// <summary>
    /// Holds new requests at the door and waits until none is inside (QEMU's drained section), so that
    /// a transaction can take one point in time across nodes. Requests a node makes to its children
    /// while finishing still pass: only the nodes named are held. Dispose to let requests in again.
    /// </summary>
    public async ValueTask<IDisposable> QuiesceAsync(CancellationToken cancellationToken = default)
    {
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        if (Interlocked.CompareExchange(ref _quiesced, gate, null) is not null)
        {
            throw new InvalidOperationException($"{this} is already quiesced");
        }
        var release = new Quiesced(this, gate);
        try
        {
            var delay = 0;
            while (Interlocked.Read(ref _inFlight) > 0)
            {
                await Task.Delay(delay, cancellationToken).ConfigureAwait(false);
                delay = Math.Min(delay + 1, 10);
            }
        }
        catch
        {
            release.Dispose();
            throw;
        }
        return release;
    }

    /// <summary>True while someone holds the node quiesced (a transaction taking its instant).</summary>
    public bool IsQuiesced => Volatile.Read(ref _quiesced) is not null;

    private sealed class Quiesced(BlockNode node, TaskCompletionSource gate) : IDisposable
    {
        public void Dispose()
        {
            if (Interlocked.CompareExchange(ref node._quiesced, null, gate) == gate)
            {
                gate.TrySetResult();
            }
        }
    }

    // Set when data changed since the last flush (QEMU's write_gen != flushed_gen); gates the flush events.
    private volatile int _writtenSinceFlush;

    /// <summary>
    /// Flushes the node. As QEMU's bdrv_co_flush, a flush that follows a change of data raises
    /// flush_to_os and (unless cache.no-flush) flush_to_disk on the node's primary child before the driver
    /// flushes; a read-only node, or one with nothing written since its last flush, raises none.
    /// </summary>
    public ValueTask FlushAsync(CancellationToken cancellationToken = default)
    {
        if (ReadOnly)
        {
            return FlushChildrenAsync(cancellationToken);
        }
        if (_writtenSinceFlush != 0 && PrimaryChild is { } primary)
        {
            return FlushWithEventsAsync(primary, cancellationToken);
        }
        return CacheNoFlush ? FlushChildrenAsync(cancellationToken) : FlushCoreAsync(cancellationToken);
    }

    private async ValueTask FlushWithEventsAsync(BlockNode primary, CancellationToken cancellationToken)
    {
        _writtenSinceFlush = 0;
        try
        {
            await primary.DebugEventAsync(BlkdebugEvent.FlushToOs).ConfigureAwait(false);
            if (CacheNoFlush)
            {
                await FlushChildrenAsync(cancellationToken).ConfigureAwait(false);
                return;
            }
            await primary.DebugEventAsync(BlkdebugEvent.FlushToDisk).ConfigureAwait(false);
            await FlushCoreAsync(cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            _writtenSinceFlush = 1;
            throw;
        }
    }

    /// <summary>The status of the extent starting at <paramref name="offset"/>, at most <paramref name="maxLength"/> bytes long.</summary>
    public ValueTask<BlockStatus> GetBlockStatusAsync(long offset, long maxLength, CancellationToken cancellationToken = default)
    {
        CheckRange(offset, 0);
        maxLength = Math.Min(maxLength, Length - offset);
        if (maxLength <= 0)
        {
            return ValueTask.FromResult(new BlockStatus(0, BlockStatusFlags.None));
        }
        return GetBlockStatusCoreAsync(offset, maxLength, cancellationToken);
    }

    // ------------------------------------------------------------------ driver hooks

    protected abstract ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken);

    protected abstract ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken);

    /// <summary>Only called when <see cref="SupportsCompressedWrites"/> is true.</summary>
    protected virtual ValueTask WriteCompressedCoreAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken) =>
        throw new NotSupportedException();

    protected abstract ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken);

    protected abstract ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken);

    protected abstract ValueTask FlushCoreAsync(CancellationToken cancellationToken);

    protected abstract ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken);

    /// <summary>Flushes what the node caches, then its children; used when the node itself may not flush.</summary>
    protected async ValueTask FlushChildrenAsync(CancellationToken cancellationToken)
    {
        foreach (var child in Children)
        {
            await child.Node.FlushAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>Image information as query-named-block-nodes reports it under <c>image</c>.</summary>
    public abstract ImageInfo GetImageInfo();

    /// <summary>
    /// Writes back what the driver caches and releases its resources. The graph closes parents before
    /// children, so a driver may still use its children here but must not close them.
    /// </summary>
    public abstract ValueTask CloseAsync();

    /// <summary>The graph owns nodes and closes them; disposing is closing.</summary>
    public async ValueTask DisposeAsync()
    {
        await CloseAsync().ConfigureAwait(false);
        GC.SuppressFinalize(this);
    }

    // ------------------------------------------------------------------ debugging hooks (blkdebug)

    /// <summary>
    /// Raises a blkdebug event on this node (QEMU's BLKDBG_EVENT on a child): a format calls it on its
    /// file child before the step the event names; only a node that overrides
    /// <see cref="OnDebugEventAsync"/> (blkdebug) reacts. It may pause the caller (a breakpoint), hence async.
    /// </summary>
    public ValueTask DebugEventAsync(BlkdebugEvent ev) => OnDebugEventAsync(ev);

    protected virtual ValueTask OnDebugEventAsync(BlkdebugEvent ev) => ValueTask.CompletedTask;

    /// <summary>
    /// The child whose data this node presents or stores (QEMU's bdrv_primary_bs): a filter's filtered
    /// child, a format's file. Debug requests (breakpoints) walk down this edge.
    /// </summary>
    public virtual BlockNode? PrimaryChild =>
        Children.FirstOrDefault(c => c.Role is "file" or "image")?.Node;

    /// <summary>The first node on the primary-child path from here that takes breakpoints, or null (ENOTSUP).</summary>
    public IDebugBreakpoints? FindDebugBreakpoints()
    {
        for (var n = this; n is not null; n = n.PrimaryChild)
        {
            if (n is IDebugBreakpoints b)
            {
                return b;
            }
        }
        return null;
    }

    // ------------------------------------------------------------------ observers and users

    /// <summary>Write observers, in the order they were added.</summary>
    public IReadOnlyList<IWriteObserver> WriteObservers => Volatile.Read(ref _observers);

    public void AddWriteObserver(IWriteObserver observer)
    {
        ArgumentNullException.ThrowIfNull(observer);
        lock (_usersLock)
        {
            _observers = [.. _observers, observer];
        }
    }

    public void RemoveWriteObserver(IWriteObserver observer)
    {
        lock (_usersLock)
        {
            _observers = _observers.Where(o => !ReferenceEquals(o, observer)).ToArray();
        }
    }

    /// <summary>
    /// Marks the node as used by something outside the graph (a job, an export) so that it cannot be
    /// deleted. <paramref name="reason"/> completes QEMU's message, e.g. "block device is in use by block job: backup".
    /// </summary>
    public IDisposable AddUser(string reason)
    {
        lock (_usersLock)
        {
            _users.Add((reason, false));
        }
        return new UserToken(this, reason, jobTarget: false);
    }

    /// <summary>
    /// Like <see cref="AddUser"/>, for a job that writes to the node (a backup target). Such a node is not
    /// drained for a transaction's instant: guests do not write to it, and the job's copy-before-write
    /// writes to it while its source drains.
    /// </summary>
    public IDisposable AddJobTarget(string reason)
    {
        lock (_usersLock)
        {
            _users.Add((reason, true));
        }
        return new UserToken(this, reason, jobTarget: true);
    }

    /// <summary>True while a job writes to this node.</summary>
    public bool IsJobTarget
    {
        get
        {
            lock (_usersLock)
            {
                return _users.Exists(u => u.JobTarget);
            }
        }
    }

    /// <summary>Why the node cannot be removed now, or null when nothing outside the graph uses it.</summary>
    public string? BusyReason
    {
        get
        {
            lock (_usersLock)
            {
                return _users.Count > 0 ? _users[0].Reason : null;
            }
        }
    }

    private void RemoveUser(string reason, bool jobTarget)
    {
        lock (_usersLock)
        {
            _users.Remove((reason, jobTarget));
        }
    }

    // ------------------------------------------------------------------ permissions

    private (BlockPermissions Perm, BlockPermissions Shared)? _proposed;

    /// <summary>What the node's users take together (committed by the graph's last permission refresh).</summary>
    public BlockPermissions Permissions { get; private set; }

    /// <summary>What every user of the node lets others do (committed).</summary>
    public BlockPermissions SharedPermissions { get; private set; } = BlockPermissions.All;

    internal void PreparePermissions(BlockPermissions perm, BlockPermissions shared)
    {
        OnPreparePermissions(perm, shared);
        _proposed = (perm, shared);
    }

    internal void CommitPermissions()
    {
        if (_proposed is { } p)
        {
            OnCommitPermissions(p.Perm, p.Shared);
            (Permissions, SharedPermissions) = p;
            _proposed = null;
        }
    }

    internal void AbortPermissions()
    {
        if (_proposed is not null)
        {
            _proposed = null;
            OnAbortPermissions();
        }
    }

    /// <summary>
    /// The graph proposes new combined masks (QEMU's bdrv_check_perm): throw to refuse them. Nothing the
    /// users see may change before <see cref="OnCommitPermissions"/>; <see cref="OnAbortPermissions"/> undoes.
    /// </summary>
    protected virtual void OnPreparePermissions(BlockPermissions perm, BlockPermissions shared)
    {
    }

    protected virtual void OnCommitPermissions(BlockPermissions perm, BlockPermissions shared)
    {
    }

    protected virtual void OnAbortPermissions()
    {
    }

    // ------------------------------------------------------------------ checks

    private void CheckWritable()
    {
        if (ReadOnly)
        {
            throw new BlockReadOnlyException(NodeName);
        }
    }

    /// <summary>
    /// Protocol nodes (files) grow when written past their end, as QEMU's file driver does; format
    /// drivers rely on that to allocate clusters. Reads past the end of such a node return zeros.
    /// </summary>
    protected virtual bool IsGrowable => false;

    /// <summary>QEMU's BDRV_MAX_LENGTH: the largest size a node can have (2^63 - 1 GiB).</summary>
    public const long MaxLength = long.MaxValue & ~((1L << 30) - 1);

    /// <summary>
    /// Changes the size of the node: image creation, qcow2 growing its file, and <c>block_resize</c>
    /// (QEMU's bdrv_co_truncate). The checks and their texts are QEMU's; the driver resizes (a filter
    /// passes it to its child); then every dirty bitmap of the node follows the new size
    /// (bdrv_dirty_bitmap_truncate: bits past a shrink are dropped, growth adds clean bits). A node's
    /// parents read their size from it, so they see the new size at once. Callers that resize a node
    /// under guest I/O quiesce it first.
    /// </summary>
    public async ValueTask TruncateAsync(long length, CancellationToken cancellationToken = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if (length > MaxLength)
        {
            throw new BlockException($"offset({length}) exceeds maximum({MaxLength})");
        }
        if (ReadOnly)
        {
            throw new BlockException("Image is read-only");
        }
        await TruncateCoreAsync(length, cancellationToken).ConfigureAwait(false);
        Bitmaps.BlockNodeBitmapExtensions.TryGetDirtyBitmaps(this)?.Truncate(Length);
    }

    /// <summary>A filter resizes its child; other drivers that can resize override this.</summary>
    protected virtual ValueTask TruncateCoreAsync(long length, CancellationToken cancellationToken) =>
        IsFilter && PrimaryChild is { } child
            ? child.TruncateAsync(length, cancellationToken)
            : throw new BlockException("Image format driver does not support resize");

    /// <summary>
    /// Whether this node lets others resize <paramref name="child"/> under it (QEMU's shared RESIZE
    /// permission on the edge). Formats need their file's size fixed (qcow2's metadata, a raw window);
    /// filters pass sizes through and do not mind. <c>block_resize</c> of a child whose parent says no
    /// fails with QEMU's permission-conflict text.
    /// </summary>
    public virtual bool SharesResize(BlockChild child) => IsFilter;

    private void CheckRange(long offset, long length)
    {
        if (IsGrowable ? offset < 0 || length < 0 || offset > long.MaxValue - length
            : offset < 0 || length < 0 || offset > Length || length > Length - offset)
        {
            throw new BlockRangeException(NodeName, offset, length, Length);
        }
    }

    public override string ToString() => $"{DriverName} node '{NodeName}'";

    private sealed class UserToken(BlockNode node, string reason, bool jobTarget) : IDisposable
    {
        private int _disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                node.RemoveUser(reason, jobTarget);
            }
        }
    }
}

/// <summary>A child edge of the graph: the role it plays for its parent (file, backing) and the node.</summary>
public sealed record BlockChild(string Role, BlockNode Node);

public enum DiscardMode
{
    Ignore,
    Unmap,
}

public enum DetectZeroesMode
{
    Off,
    On,
    Unmap,
}

/// <summary>A write on a read-only node (EPERM on the wire).</summary>
public sealed class BlockReadOnlyException(string nodeName)
    : IOException($"Node '{nodeName}' is read-only");

/// <summary>A request outside the node (EINVAL on the wire); callers validate first, so this is a bug guard.</summary>
public sealed class BlockRangeException(string nodeName, long offset, long length, long size)
    : IOException($"Request offset {offset} length {length} is outside node '{nodeName}' of size {size}");
