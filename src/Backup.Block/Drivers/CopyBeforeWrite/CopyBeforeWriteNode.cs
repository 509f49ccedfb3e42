using Backup.Block.Bitmaps;
using Backup.Block.Copy;

namespace Backup.Block.Drivers.CopyBeforeWrite;

/// <summary>What a failed copy-before-write breaks (QAPI OnCbwError).</summary>
public enum OnCbwError
{
    /// <summary>The guest write fails with the copy's error; the snapshot stays whole.</summary>
    BreakGuestWrite,

    /// <summary>The guest write goes on; the snapshot is broken and no more copies are made.</summary>
    BreakSnapshot,
}

/// <summary>
/// The copy-before-write filter (QEMU's block/copy-before-write.c): a node over its <c>file</c> child that,
/// before a write changes the child's data, has its <see cref="Copy.BlockCopy"/> save the old data to
/// <c>target</c>, so the target (with what was never overwritten) is the child as it was when the filter
/// was made. Users add it with blockdev-add; a backup job inserts one above its source and drives the
/// same block copy for its background copies.
///
/// The copy runs as a write observer on the file child rather than in this node's write path: exports
/// and other parents attach to nodes by reference in backupd (QEMU moves the child's parents onto the
/// filter), so a write that reaches the child by any path is seen, and the point in time holds for all of
/// them. Writes through this node reach the child's I/O path and its observer like any other.
///
/// Like QEMU's filter it keeps two bitmaps of its own, listed (nameless) by the node queries: the clusters
/// a snapshot reader may read (the copy bitmap when the filter was made) and those copy-before-write saved.
/// </summary>
public sealed partial class CopyBeforeWriteNode : BlockNode
{
    private readonly BlockNode _file;
    private readonly BlockNode _target;
    private readonly BlockCopy _copy;
    private readonly OnCbwError _onError;
    private readonly TimeSpan _timeout;
    private readonly DirtyBitmap _done;
    private readonly DirtyBitmap _access;
    private readonly Observer _observer;
    private readonly Lock _lock = new();
    /// <summary>The error that broke the snapshot (break-snapshot), or null while it is whole.</summary>
    private Exception? _snapshotError;
    private int _detached;

    /// <summary>
    /// A filter over <paramref name="file"/> whose copy-before-write is <paramref name="copy"/> (from
    /// <paramref name="file"/> to <paramref name="target"/>); it owns the copy from now on.
    /// <paramref name="timeout"/> bounds how long a guest write waits for its copy (zero: no bound).
    /// </summary>
    public CopyBeforeWriteNode(NodeContext context, BlockNode file, BlockNode target, BlockCopy copy,
        OnCbwError onError = OnCbwError.BreakGuestWrite, TimeSpan timeout = default) : base(context)
    {
        ArgumentNullException.ThrowIfNull(file);
        ArgumentNullException.ThrowIfNull(target);
        ArgumentNullException.ThrowIfNull(copy);
        _file = file;
        _target = target;
        _copy = copy;
        _onError = onError;
        _timeout = timeout;
        Children = [new BlockChild("file", file), new BlockChild("target", target)];
        var set = this.GetDirtyBitmaps();
        // QEMU's order: the done bitmap first, then the access bitmap (listed newest first).
        // As fine as what one guest copy saves: a snapshot reader must not take a partly saved cluster from the target.
        _done = set.CreateAnonymous(copy.GuestCopyGrain, enabled: false);
        _access = set.CreateAnonymous(copy.ClusterSize, enabled: false);
        _access.Bits.Merge(copy.CopyBitmap);
        _observer = new Observer(this);
        file.AddWriteObserver(_observer);
    }

    public override string DriverName => "copy-before-write";

    public override bool IsFilter => true;

    /// <summary>QEMU's filter takes its source's size as fixed while the backup runs.</summary>
    public override bool SharesResize(BlockChild child) => false;

    public override string Filename => _file.Filename;

    public override long Length => _file.Length;

    public override IReadOnlyList<BlockChild> Children { get; }

    /// <summary>The block copy behind the filter (the backup job drives it too).</summary>
    public BlockCopy BlockCopy => _copy;

    public BlockNode Target => _target;

    public OnCbwError OnCbwError => _onError;

    /// <summary>True once a failed copy broke the snapshot (on-cbw-error=break-snapshot).</summary>
    public bool IsSnapshotBroken => Volatile.Read(ref _snapshotError) is not null;

    /// <summary>The copy failure that broke the snapshot, or null.</summary>
    public Exception? SnapshotError => Volatile.Read(ref _snapshotError);

    /// <summary>The clusters copy-before-write saved to the target.</summary>
    public HBitmap DoneBitmap => _done.Bits;

    /// <summary>The clusters a reader of the snapshot may read.</summary>
    public HBitmap AccessBitmap => _access.Bits;

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) =>
        _file.ReadAsync(offset, buffer, cancellationToken);

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken) =>
        _file.WriteAsync(offset, data, flags, cancellationToken);

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken) =>
        _file.WriteZeroesAsync(offset, length, flags, cancellationToken);

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        _file.DiscardAsync(offset, length, cancellationToken);

    /// <summary>Only the file child, as QEMU's filter: the target is the snapshot's, not the guest's.</summary>
    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => _file.FlushAsync(cancellationToken);

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        _file.GetBlockStatusAsync(offset, length, cancellationToken);

    /// <summary>As QEMU shows a filter: its own format name over the child's sizes, the child as backing image.</summary>
    public override ImageInfo GetImageInfo()
    {
        var below = _file.GetImageInfo();
        return new ImageInfo
        {
            Filename = below.Filename,
            Format = DriverName,
            VirtualSize = Length,
            ActualSize = below.ActualSize,
            ClusterSize = below.ClusterSize,
            BackingImage = below,
        };
    }

    /// <summary>blockdev-del: waits for copies still running (a timed-out one goes on in the background), then detaches.</summary>
    public override async ValueTask CloseAsync()
    {
        await _copy.StopGuestCopiesAsync().ConfigureAwait(false);
        Detach();
    }

    /// <summary>
    /// Stops copy-before-write and drops the filter's bitmaps and its block copy. Call once no copy runs
    /// (a job does, after it stopped guest copies and its own); repeated calls do nothing.
    /// </summary>
    public void Detach()
    {
        if (Interlocked.Exchange(ref _detached, 1) != 0)
        {
            return;
        }
        _file.RemoveWriteObserver(_observer);
        var set = this.GetDirtyBitmaps();
        set.Release(_access);
        set.Release(_done);
        _copy.Dispose();
    }

    /// <summary>The guest write [offset, offset + length) is about to reach the file child.</summary>
    private ValueTask BeforeWriteAsync(long offset, long length)
    {
        if (length <= 0 || Volatile.Read(ref _snapshotError) is not null)
        {
            return ValueTask.CompletedTask;
        }
        var copy = _copy.CopyBeforeWriteAsync(offset, length);
        if (copy.IsCompletedSuccessfully && _timeout == TimeSpan.Zero)
        {
            var readers = MarkDone(offset, length, error: null);
            return readers is null ? ValueTask.CompletedTask : new ValueTask(readers);
        }
        return AwaitCopyAsync(copy, offset, length);
    }

    private async ValueTask AwaitCopyAsync(ValueTask copy, long offset, long length)
    {
        Exception? error = null;
        try
        {
            if (_timeout > TimeSpan.Zero && !copy.IsCompleted)
            {
                var task = copy.AsTask();
                try
                {
                    await task.WaitAsync(_timeout).ConfigureAwait(false);
                }
                catch (TimeoutException)
                {
                    // The copy goes on in the background (QEMU cannot cancel it either); its clusters are
                    // copied once it ends, and a failure puts them back. Its outcome is no one's to report.
                    _ = task.ContinueWith(static t => _ = t.Exception, CancellationToken.None,
                        TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
                    throw Posix.LibC.ErrnoException(Posix.LibC.ETIMEDOUT);
                }
            }
            else
            {
                await copy.ConfigureAwait(false);
            }
        }
#pragma warning disable CA1031 // Every copy failure is the guest's or the snapshot's, by on-cbw-error.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            error = ex;
        }
        if (error is not null && _onError == OnCbwError.BreakGuestWrite)
        {
            throw error;
        }
        if (MarkDone(offset, length, error) is { } readers)
        {
            await readers.ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Records the clusters under a guest write as saved (QEMU marks the aligned range once block-copy
    /// succeeded), or the snapshot as broken by <paramref name="error"/> (break-snapshot). Returns the
    /// snapshot reads of the source in that range still running, which the write must let end first
    /// (QEMU's frozen read requests), or null when there are none.
    /// </summary>
    private Task? MarkDone(long offset, long length, Exception? error)
    {
        var grain = _copy.GuestCopyGrain;
        var start = offset / grain * grain;
        var end = Math.Min((offset + length + grain - 1) / grain * grain, _done.Bits.Size);
        if (end <= start)
        {
            return null;
        }
        lock (_lock)
        {
            if (error is null)
            {
                _done.Bits.Set(start, end - start);
            }
            else
            {
                _snapshotError ??= error;
            }
            return FrozenReadsLocked(start, end);
        }
    }

    /// <summary>The filter's hook on its file child's I/O path.</summary>
    private sealed class Observer(CopyBeforeWriteNode filter) : IWriteObserver
    {
        public ValueTask BeforeWriteAsync(BlockNode node, long offset, long length, WriteKind kind, CancellationToken cancellationToken) =>
            filter.BeforeWriteAsync(offset, length);

        public void AfterWrite(BlockNode node, long offset, long length, WriteKind kind)
        {
        }
    }
}
