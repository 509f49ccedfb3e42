using System.Buffers;
using System.Runtime.ExceptionServices;

namespace Backup.Block.Drivers.Qcow2;

// Allocating writes in three steps, so that the metadata lock is not held while data is written
// (QEMU's QCowL2Meta scheme): (1) under the lock, wait for in-flight allocations that overlap, then
// decide each cluster's host offset (allocating from the reserve) and register the range as in
// flight; (2) without the lock, write the data (copy-on-write for partial clusters); (3) under the
// lock, point the L2 entries at the new clusters and write them through. Until (3) readers see the
// old mapping, which is right: the write has not completed. Requests that change the same clusters
// (writes, zeroing, discard) wait in (1) or in ChangeClustersAsync until (3) is done, so a
// copy-on-write never races another change of its cluster.
public sealed partial class Qcow2Node
{
    private readonly Qcow2InFlightAllocations _inFlight = new();

    /// <summary>What step (1) decided for one guest cluster.</summary>
    private readonly record struct ClusterPlan(Qcow2L2Entry Old, long Host, bool Publish, bool Fresh);

    /// <summary>A write within one L2 table that may allocate clusters.</summary>
    private async ValueTask WriteAllocatingAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        var firstCluster = offset >> _clusterBits;
        var endCluster = ((offset + data.Length - 1) >> _clusterBits) + 1;
        var count = (int)(endCluster - firstCluster);
        var l1Index = (int)(offset / L2Coverage);
        var firstIndex = (int)(firstCluster & (_l2Entries - 1));
        var plan = ArrayPool<ClusterPlan>.Shared.Rent(count);
        try
        {
            Qcow2InFlightAllocations.Range flight;
            await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
            try
            {
                await WaitForInFlightLockedAsync(firstCluster, endCluster, cancellationToken).ConfigureAwait(false);
                var (table, _) = await GetL2ForUpdateAsync(l1Index, cancellationToken).ConfigureAwait(false);
                for (var i = 0; i < count; i++)
                {
                    var entry = new Qcow2L2Entry(Volatile.Read(ref table[firstIndex + i]));
                    if (IsWritableInPlace(entry))
                    {
                        plan[i] = new ClusterPlan(entry, entry.HostOffset, Publish: false, Fresh: false);
                        continue;
                    }
                    // A preallocated zero cluster we own keeps its host cluster; in an external data file
                    // a cluster's place is fixed (its guest offset); anything else gets a new cluster.
                    var reuse = entry.IsZero && entry.IsCopied && HasHostCluster(entry);
                    var host = reuse ? entry.HostOffset
                        : _hasDataFile ? (firstCluster + i) << _clusterBits
                        : await AllocateClusterAsync(cancellationToken).ConfigureAwait(false);
                    plan[i] = new ClusterPlan(entry, host, Publish: true, Fresh: !reuse && !_hasDataFile);
                }
                flight = _inFlight.Add(firstCluster, endCluster);
            }
            finally
            {
                _meta.Release();
            }

            ExceptionDispatchInfo? failure = null;
            try
            {
                await WriteDataAsync(offset, data, plan.AsMemory(0, count), cancellationToken).ConfigureAwait(false);
            }
#pragma warning disable CA1031 // rethrown below, once the clusters are published or given back
            catch (Exception e)
#pragma warning restore CA1031
            {
                failure = ExceptionDispatchInfo.Capture(e);
            }
            // Step (3) must run whatever happened, or the range would block its clusters for ever.
            await _meta.WaitAsync(CancellationToken.None).ConfigureAwait(false);
            try
            {
                if (failure is null)
                {
                    // Not cancellable: the data is written, and half a publish would leave the cache and the
                    // file disagreeing about which cluster holds it.
                    await PublishAsync(l1Index, firstIndex, plan, count).ConfigureAwait(false);
                }
                else
                {
                    // Never referenced: the clusters go back (after the next flush, like any free).
                    for (var i = 0; i < count; i++)
                    {
                        if (plan[i].Fresh)
                        {
                            FreeLater(plan[i].Host);
                        }
                    }
                }
            }
            finally
            {
                _inFlight.Complete(flight);
                _meta.Release();
            }
            failure?.Throw();
        }
        finally
        {
            ArrayPool<ClusterPlan>.Shared.Return(plan);
        }
    }

    /// <summary>
    /// Step (2): writes the request's bytes to the planned host clusters, outside the metadata lock.
    /// Slices that land on consecutive host bytes go out as one write; a partial new cluster is filled
    /// from what the guest cluster reads as now (copy-on-write), or, where that is all zeros, zeroed by the
    /// file first (QEMU's handle_alloc_space), so only the request's bytes are written. Counted as a
    /// lock-free request, so clusters the old mappings name are not reused before it ends.
    /// </summary>
    private async ValueTask WriteDataAsync(long offset, ReadOnlyMemory<byte> data, ReadOnlyMemory<ClusterPlan> plan,
        CancellationToken cancellationToken)
    {
        var parity = EnterLockFree();
        byte[]? cow = null;
        long runHost = 0;
        int runStart = 0, runLength = 0;
        try
        {
            var pos = 0;
            for (var i = 0; i < plan.Length; i++)
            {
                var p = plan.Span[i];
                var guest = offset + pos;
                var intra = (int)(guest & (_clusterSize - 1));
                var n = Math.Min(_clusterSize - intra, data.Length - pos);
                if (p.Publish && n < _clusterSize
                    && !(p.Fresh && ReadsZerosBelow(p.Old) && await ZeroNewClusterAsync(p.Host, cancellationToken).ConfigureAwait(false)))
                {
                    await FlushRunAsync().ConfigureAwait(false);
                    cow ??= ArrayPool<byte>.Shared.Rent(_clusterSize);
                    var cluster = cow.AsMemory(0, _clusterSize);
                    // QEMU's copy-on-write of a partly written new cluster: cow_read, then one merged
                    // write of the old data and the new (cow_write, no write_aio).
                    await _file.DebugEventAsync(BlkdebugEvent.CowRead).ConfigureAwait(false);
                    await ReadClusterSourceAsync(guest - intra, p.Old, cluster, cancellationToken).ConfigureAwait(false);
                    data.Slice(pos, n).CopyTo(cluster[intra..]);
                    await _file.DebugEventAsync(BlkdebugEvent.CowWrite).ConfigureAwait(false);
                    await _data.WriteAsync(p.Host, cluster, WriteFlags.None, cancellationToken).ConfigureAwait(false);
                }
                else
                {
                    var host = p.Host + intra;
                    if (runLength > 0 && host != runHost + runLength)
                    {
                        await FlushRunAsync().ConfigureAwait(false);
                    }
                    if (runLength == 0)
                    {
                        (runHost, runStart) = (host, pos);
                    }
                    runLength += n;
                }
                pos += n;
            }
            await FlushRunAsync().ConfigureAwait(false);
        }
        finally
        {
            ExitLockFree(parity);
            if (cow is not null)
            {
                ArrayPool<byte>.Shared.Return(cow);
            }
        }

        async ValueTask FlushRunAsync()
        {
            if (runLength > 0)
            {
                await _file.DebugEventAsync(BlkdebugEvent.WriteAio).ConfigureAwait(false);
                await _data.WriteAsync(runHost, data.Slice(runStart, runLength), WriteFlags.None, cancellationToken).ConfigureAwait(false);
                runLength = 0;
            }
        }
    }

    /// <summary>What a copy-on-write of a cluster with this entry would read is all zeros.</summary>
    private bool ReadsZerosBelow(Qcow2L2Entry entry) => KindOf(entry) switch
    {
        ClusterKind.Zero => true,
        ClusterKind.Unallocated => _backing is null,
        _ => false,
    };

    /// <summary>
    /// Makes a new host cluster read as zeros without writing zero buffers (fallocate's zero range); false
    /// where the file cannot (the caller copies on write instead). A 4 KiB write into a new 64 KiB cluster
    /// then costs 4 KiB of data, not 64.
    /// </summary>
    private async ValueTask<bool> ZeroNewClusterAsync(long host, CancellationToken cancellationToken)
    {
        await _file.DebugEventAsync(BlkdebugEvent.ClusterAllocSpace).ConfigureAwait(false);
        try
        {
            await _data.WriteZeroesAsync(host, _clusterSize, WriteFlags.NoFallback, cancellationToken).ConfigureAwait(false);
            return true;
        }
        catch (IOException e) when (Posix.LibC.ErrnoOf(e) is Posix.LibC.EOPNOTSUPP or Posix.LibC.EAGAIN)
        {
            return false;
        }
    }

    /// <summary>
    /// Step (3), metadata lock held: the L2 entries name the written clusters; once they are written, the
    /// old ones lose their reference. If the entries cannot be written, the cache goes back to the old
    /// ones and nothing is freed (the new clusters leak rather than risk a freed cluster being referenced).
    /// </summary>
    private async ValueTask PublishAsync(int l1Index, int firstIndex, ClusterPlan[] plan, int count)
    {
        // The table may have left the cache meanwhile; the file has every change (write-through), so
        // loading it again is safe, and overlapping changes waited for us.
        var (table, l2Offset) = await GetL2ForUpdateAsync(l1Index, CancellationToken.None).ConfigureAwait(false);
        int first = int.MaxValue, last = -1;
        for (var i = 0; i < count; i++)
        {
            if (!plan[i].Publish)
            {
                continue;
            }
            Volatile.Write(ref table[firstIndex + i], Qcow2L2Entry.Standard(plan[i].Host).Raw);
            first = Math.Min(first, firstIndex + i);
            last = firstIndex + i;
        }
        if (last < 0)
        {
            return;
        }
        try
        {
            // Data first (step 2), then the entries that point at it.
            await WriteL2EntriesAsync(l2Offset, table, first, last - first + 1, CancellationToken.None).ConfigureAwait(false);
        }
        catch
        {
            for (var i = 0; i < count; i++)
            {
                if (plan[i].Publish)
                {
                    Volatile.Write(ref table[firstIndex + i], plan[i].Old.Raw);
                }
            }
            throw;
        }
        for (var i = 0; i < count; i++)
        {
            if (plan[i].Publish)
            {
                DropReference(plan[i].Old, keep: plan[i].Fresh ? 0 : plan[i].Host);
            }
        }
        await ProcessPendingFreesIfManyAsync(CancellationToken.None).ConfigureAwait(false);
    }

    /// <summary>
    /// Metadata lock held on entry and on return: waits (with the lock released) until no allocation of
    /// guest clusters [<paramref name="first"/>, <paramref name="end"/>) is in flight.
    /// </summary>
    private async ValueTask WaitForInFlightLockedAsync(long first, long end, CancellationToken cancellationToken)
    {
        while (_inFlight.FindOverlap(first, end) is { } other)
        {
            _meta.Release();
            try
            {
                await other.Done.WaitAsync(cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                // Taken back even when cancelled: the caller releases it.
                await _meta.WaitAsync(CancellationToken.None).ConfigureAwait(false);
            }
        }
    }
}

/// <summary>
/// Guest cluster ranges whose allocating writes have planned their clusters but not yet published the
/// L2 entries. Guarded by the node's metadata lock; a range's task completes when it is published.
/// </summary>
internal sealed class Qcow2InFlightAllocations
{
    private readonly List<Range> _ranges = [];

    public sealed class Range(long first, long end)
    {
        private readonly TaskCompletionSource _done = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public long First { get; } = first;

        public long End { get; } = end;

        public Task Done => _done.Task;

        internal void SetDone() => _done.TrySetResult();
    }

    public Range? FindOverlap(long first, long end)
    {
        foreach (var r in _ranges)
        {
            if (r.First < end && first < r.End)
            {
                return r;
            }
        }
        return null;
    }

    public Range Add(long first, long end)
    {
        var r = new Range(first, end);
        _ranges.Add(r);
        return r;
    }

    public void Complete(Range range)
    {
        _ranges.Remove(range);
        range.SetDone();
    }
}
