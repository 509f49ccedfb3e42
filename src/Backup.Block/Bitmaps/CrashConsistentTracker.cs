namespace Backup.Block.Bitmaps;

/// <summary>
/// Where a crash-consistent bitmap's bits reach stable storage, a whole region at a time. Bits are only
/// ever added on disk while the image is open, so what is on disk stays a superset of the bitmap.
/// </summary>
public interface ICrashJournal
{
    /// <summary>Guest bytes one region covers: a power of two, at least eight granules.</summary>
    long RegionSize { get; }

    /// <summary>Sets every bit of the given regions on disk and makes them durable before returning.</summary>
    ValueTask PersistAsync(IReadOnlyList<long> regions, CancellationToken cancellationToken);
}

/// <summary>
/// Keeps one bitmap crash-consistent (our extension to QEMU's persistent bitmaps): before a write that
/// the bitmap records reaches the driver, the regions it touches are already dirty on stable storage.
/// After a crash the stored bitmap is then a superset of every write that reached the disk, and the next
/// incremental backup is still complete.
/// </summary>
/// <remarks>
/// The cost falls on the first write into a region since the image was opened: it waits for one journal
/// update (a few sector writes and a flush). Writers that arrive while an update runs share the next one
/// (group commit), so a burst of fresh regions costs a handful of flushes, not one each. Later writes into
/// a region find its bit in <see cref="_durable"/> and pass through without I/O or allocation.
/// Over-approximation: a crash leaves at most every region touched since open dirty, rounded out to whole
/// regions; a clean close stores the exact bitmap again.
/// </remarks>
public sealed class CrashConsistentTracker : IWriteObserver
{
    private readonly DirtyBitmap _bitmap;
    private readonly ICrashJournal _journal;
    private readonly int _regionBits;
    private readonly long _regionCount;
    /// <summary>One bit per region: set once the region is dirty on stable storage.</summary>
    private readonly ulong[] _durable;
    /// <summary>One bit per region: queued for (or part of) the journal update in progress.</summary>
    private readonly ulong[] _queued;
    private readonly Lock _lock = new();
    private List<long> _pending = [];
    private TaskCompletionSource? _nextUpdate;
    private bool _updating;
    private volatile bool _detached;

    public CrashConsistentTracker(DirtyBitmap bitmap, ICrashJournal journal)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        ArgumentNullException.ThrowIfNull(journal);
        if (!long.IsPow2(journal.RegionSize) || journal.RegionSize < 8 * bitmap.Granularity)
        {
            throw new ArgumentException("a region must be a power of two of at least eight granules", nameof(journal));
        }
        _bitmap = bitmap;
        _journal = journal;
        _regionBits = System.Numerics.BitOperations.Log2((ulong)journal.RegionSize);
        _regionCount = Math.Max(1, (bitmap.Size + journal.RegionSize - 1) >> _regionBits);
        _durable = new ulong[(_regionCount + 63) / 64];
        _queued = new ulong[_durable.Length];
    }

    public DirtyBitmap Bitmap => _bitmap;

    public long RegionSize => _journal.RegionSize;

    /// <summary>Regions dirty on stable storage since the tracker started (for tests and the query).</summary>
    public long DurableRegions
    {
        get
        {
            lock (_lock)
            {
                return _durable.Sum(w => (long)System.Numerics.BitOperations.PopCount(w));
            }
        }
    }

    public ValueTask BeforeWriteAsync(BlockNode node, long offset, long length, WriteKind kind, CancellationToken cancellationToken)
    {
        // A bitmap that does not record this write will not hold it in memory either.
        // The journal covers the bitmap as it was stored; qcow2 images with bitmaps do not grow.
        var limit = Math.Min(_bitmap.Size, _regionCount << _regionBits);
        if (_detached || length <= 0 || !_bitmap.Recording || offset >= limit)
        {
            return ValueTask.CompletedTask;
        }
        var first = offset >> _regionBits;
        var last = (Math.Min(offset + length, limit) - 1) >> _regionBits;
        for (var r = first; r <= last; r++)
        {
            if ((Volatile.Read(ref _durable[r >> 6]) & (1UL << (int)(r & 63))) == 0)
            {
                return new ValueTask(PersistRegionsAsync(first, last));
            }
        }
        return ValueTask.CompletedTask;
    }

    public void AfterWrite(BlockNode node, long offset, long length, WriteKind kind)
    {
    }

    /// <summary>
    /// Makes every bit the bitmap holds now durable: for bits that did not come from writes (a merge into
    /// the bitmap), which the write path never saw.
    /// </summary>
    public async ValueTask PersistBitsAsync(CancellationToken cancellationToken)
    {
        var waits = new List<Task>();
        var regions = new List<(long First, long Last)>();
        foreach (var e in _bitmap.Bits.DirtyExtents())
        {
            var end = Math.Min(e.End, _bitmap.Size);
            if (end > e.Offset)
            {
                regions.Add((e.Offset >> _regionBits, (end - 1) >> _regionBits));
            }
        }
        foreach (var (first, last) in regions)
        {
            waits.Add(PersistRegionsAsync(first, last));
        }
        await Task.WhenAll(waits).WaitAsync(cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Stops tracking; returns when no journal update is running any more.</summary>
    public async Task DetachAsync()
    {
        _detached = true;
        _bitmap.Node.RemoveWriteObserver(this);
        while (true)
        {
            lock (_lock)
            {
                if (!_updating)
                {
                    return;
                }
            }
            await Task.Delay(1).ConfigureAwait(false);
        }
    }

    /// <summary>Returns once every region in [first, last] is durable; fails if the update that was to write one failed.</summary>
    private async Task PersistRegionsAsync(long first, long last)
    {
        while (true)
        {
            Task wait;
            var start = false;
            lock (_lock)
            {
                var missing = false;
                for (var r = first; r <= last; r++)
                {
                    var (word, bit) = ((int)(r >> 6), 1UL << (int)(r & 63));
                    if ((_durable[word] & bit) != 0)
                    {
                        continue;
                    }
                    missing = true;
                    if ((_queued[word] & bit) == 0)
                    {
                        _queued[word] |= bit;
                        _pending.Add(r);
                    }
                }
                if (!missing)
                {
                    return;
                }
                // A region queued by the update already running may be written by it or not: the next
                // update is always late enough. Checked again after it, in case the running one failed.
                _nextUpdate ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                wait = _nextUpdate.Task;
                if (!_updating)
                {
                    _updating = true;
                    start = true;
                }
            }
            if (start)
            {
                _ = Task.Run(UpdateLoopAsync);
            }
            await wait.ConfigureAwait(false);
        }
    }

    /// <summary>One journal update at a time; each takes every region queued since the last began.</summary>
    private async Task UpdateLoopAsync()
    {
        while (true)
        {
            List<long> regions;
            TaskCompletionSource? done;
            lock (_lock)
            {
                (regions, _pending) = (_pending, []);
                (done, _nextUpdate) = (_nextUpdate, null);
                if (done is null)
                {
                    _updating = false;
                    return;
                }
            }
            try
            {
                if (regions.Count > 0)
                {
                    regions.Sort();
                    await _journal.PersistAsync(regions, CancellationToken.None).ConfigureAwait(false);
                }
                lock (_lock)
                {
                    foreach (var r in regions)
                    {
                        _durable[r >> 6] |= 1UL << (int)(r & 63);
                    }
                }
                done.SetResult();
            }
            catch (Exception ex)
            {
                // The writes waiting for this update fail (nothing of them reached the disk); the regions
                // are queued again by the next write that needs them.
                lock (_lock)
                {
                    foreach (var r in regions)
                    {
                        _queued[r >> 6] &= ~(1UL << (int)(r & 63));
                    }
                }
                done.SetException(ex);
            }
        }
    }
}
