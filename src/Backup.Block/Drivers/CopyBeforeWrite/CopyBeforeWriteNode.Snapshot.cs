using Backup.Block.Posix;

namespace Backup.Block.Drivers.CopyBeforeWrite;

/// <summary>
/// The filter's snapshot view (QEMU's bdrv_co_preadv_snapshot, bdrv_co_snapshot_block_status and
/// bdrv_co_pdiscard_snapshot), which a snapshot-access node serves: the file child as it was when the
/// filter was made. A cluster copy-before-write saved is read from the target; any other from the file
/// child, and a guest write to such a cluster waits until that read has ended (after it saved the old
/// data), so the reader never sees the new data. What the snapshot may not read (outside the copy
/// bitmap the filter started with, discarded, or everything once break-snapshot broke it) fails with
/// EACCES, as in QEMU.
/// </summary>
public sealed partial class CopyBeforeWriteNode
{
    /// <summary>Snapshot reads of the file child in flight (under _lock); guest writes over them wait.</summary>
    private readonly List<FrozenRead> _frozenReads = [];

    /// <summary>Reads the snapshot: [offset, offset + buffer.Length) as the file child was when the filter was made.</summary>
    public async ValueTask SnapshotReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        while (!buffer.IsEmpty)
        {
            var (child, length, frozen) = LockSnapshotRange(offset, buffer.Length);
            try
            {
                await child.ReadAsync(offset, buffer[..(int)length], cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                Unfreeze(frozen);
            }
            offset += length;
            buffer = buffer[(int)length..];
        }
    }

    /// <summary>
    /// The snapshot's block status at <paramref name="offset"/>: the target's where copy-before-write
    /// saved the data (always allocated: the snapshot itself holds it), the file child's elsewhere.
    /// </summary>
    public async ValueTask<BlockStatus> SnapshotBlockStatusAsync(long offset, long length, CancellationToken cancellationToken)
    {
        var (child, run, frozen) = LockSnapshotRange(offset, length);
        try
        {
            var st = await child.GetBlockStatusAsync(offset, run, cancellationToken).ConfigureAwait(false);
            if (st.Length <= 0)
            {
                st = new BlockStatus(run, BlockStatusFlags.Data | BlockStatusFlags.Allocated);
            }
            if (ReferenceEquals(child, _target))
            {
                // A fresh target may leave saved zeros unallocated (block copy skips them): still ours.
                st = st with { Flags = st.Flags | BlockStatusFlags.Allocated, Depth = 1 };
            }
            return st with { Length = Math.Min(st.Length, run) };
        }
        finally
        {
            Unfreeze(frozen);
        }
    }

    /// <summary>
    /// The reader is done with [offset, offset + length): the whole clusters in it leave the snapshot
    /// (reads there fail from now on), are no longer copied before writes, and are discarded on the
    /// target, so a fleecing image gives back what the reader has taken.
    /// </summary>
    public async ValueTask SnapshotDiscardAsync(long offset, long length, CancellationToken cancellationToken)
    {
        var cluster = _copy.ClusterSize;
        var start = (offset + cluster - 1) / cluster * cluster;
        var end = (offset + length) / cluster * cluster;
        if (offset + length >= Length)
        {
            // The disk's last cluster may be partial: a discard up to the end covers it.
            end = Math.Max(end, Math.Min((offset + length + cluster - 1) / cluster * cluster, _access.Bits.Size));
        }
        if (end <= start)
        {
            return;
        }
        lock (_lock)
        {
            _access.Bits.Reset(start, end - start);
        }
        _copy.Reset(start, end - start);
        var targetEnd = Math.Min(end, _target.Length);
        if (targetEnd > start && !_target.ReadOnly)
        {
            await _target.DiscardAsync(start, targetEnd - start, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Where the snapshot's [offset, offset + length) starts to be readable from (QEMU's
    /// cbw_snapshot_read_lock): the target for a run copy-before-write saved, otherwise the file child for
    /// the run not saved, registered as a frozen read. Throws EACCES where the snapshot cannot be read.
    /// </summary>
    private (BlockNode Child, long Length, FrozenRead? Frozen) LockSnapshotRange(long offset, long length)
    {
        lock (_lock)
        {
            if (_snapshotError is not null || Volatile.Read(ref _detached) != 0 || _access.Bits.NextClean(offset, length) >= 0)
            {
                throw LibC.ErrnoException(LibC.EACCES);
            }
            if (_done.Bits.Get(offset))
            {
                var clean = _done.Bits.NextClean(offset, length);
                return (_target, clean < 0 ? length : clean - offset, null);
            }
            var dirty = _done.Bits.NextDirty(offset, length);
            var run = dirty < 0 ? length : dirty - offset;
            var frozen = new FrozenRead(offset, offset + run);
            _frozenReads.Add(frozen);
            return (_file, run, frozen);
        }
    }

    private void Unfreeze(FrozenRead? frozen)
    {
        if (frozen is null)
        {
            return;
        }
        lock (_lock)
        {
            _frozenReads.Remove(frozen);
        }
        frozen.Done.TrySetResult();
    }

    /// <summary>The frozen reads overlapping [start, end), as one task, or null (call under _lock).</summary>
    private Task? FrozenReadsLocked(long start, long end)
    {
        if (_frozenReads.Count == 0)
        {
            return null;
        }
        List<Task>? overlapping = null;
        foreach (var f in _frozenReads)
        {
            if (f.Start < end && f.End > start)
            {
                (overlapping ??= []).Add(f.Done.Task);
            }
        }
        return overlapping is null ? null : Task.WhenAll(overlapping);
    }

    /// <summary>A snapshot read of the file child: guest writes to its range wait for <see cref="Done"/>.</summary>
    private sealed class FrozenRead(long start, long end)
    {
        public long Start { get; } = start;
        public long End { get; } = end;
        public TaskCompletionSource Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }
}
