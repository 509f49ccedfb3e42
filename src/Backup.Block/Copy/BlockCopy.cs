using System.Buffers;
using Backup.Block.Bitmaps;

namespace Backup.Block.Copy;

/// <summary>How a <see cref="BlockCopy"/> cuts its work (QEMU's block-copy parameters).</summary>
public sealed record BlockCopyOptions
{
    /// <summary>x-perf min-cluster-size: the copy unit is at least this (a power of two); 0 for none.</summary>
    public long MinClusterSize { get; init; }

    /// <summary>The largest claim and buffer (x-perf max-chunk); 0 for the default of 1 MiB.</summary>
    public int MaxChunk { get; init; }

    /// <summary>Write data clusters compressed (the target supports it: checked before).</summary>
    public bool Compress { get; init; }

    /// <summary>
    /// Discard each range on the source once a background copy wrote it to the target (upstream QEMU's
    /// discard-source). Not for guest copies: a guest write may cover part of a cluster only.
    /// </summary>
    public bool DiscardSource { get; init; }

    /// <summary>
    /// No guest copies until <see cref="BlockCopy.Activate"/>: a job inserts its filter, then takes its
    /// point in time (freezes its bitmap, sets what to copy) and only then lets guest writes copy.
    /// </summary>
    public bool StartInactive { get; init; }

    /// <summary>
    /// A guest write copies only the blocks it overwrites (4 KiB and up), not its whole clusters; the
    /// owner's copies take the rest later. Only for an owner that copies everything left (a backup that
    /// is not sync=none), and only where nothing can show through the target (no backing, not
    /// compressed): a partly saved cluster reads zeros there until the rest arrives.
    /// </summary>
    public bool GuestCopiesAtWriteSize { get; init; }
}

/// <summary>
/// What a job that drives a <see cref="BlockCopy"/> adds to it: the error policy of its background
/// copies, progress, and whether guest copies may hand their target write to the background.
/// </summary>
public interface IBlockCopyOwner
{
    /// <summary>Moves when an error was handled; a copy that failed under an older epoch just retries.</summary>
    int ErrorEpoch { get; }

    bool IsCancelled { get; }

    /// <summary>
    /// A background copy's read or write failed. Returns to retry it; throws to give up (the copy's
    /// bits go back to the copy bitmap). <paramref name="epoch"/> is <see cref="ErrorEpoch"/> before the attempt.
    /// </summary>
    ValueTask OnErrorAsync(Exception error, bool isRead, int epoch);

    /// <summary>
    /// Bytes copied (by the owner's copies, guest copies and deferred writes alike; zero runs count in
    /// full). <paramref name="guestCopy"/> is true for copies a guest write made (copy-before-write),
    /// which a rate-limited owner counts against its limit, as QEMU's block-copy does.
    /// </summary>
    void OnProgress(long bytes, bool guestCopy);

    /// <summary>
    /// True when a guest copy may return once its old data is in memory and write it to the target in the
    /// background: a failure of that write is the owner's to report (<see cref="BlockCopy.DeferredFailure"/>).
    /// </summary>
    bool DeferGuestCopies { get; }
}

/// <summary>
/// The start of a dirty run as the source's block status describes it (QEMU's block-copy block-status
/// step): [<see cref="Offset"/>, <see cref="End"/>) is whole clusters (up to the end of the disk) that
/// all read as zeros, or that hold data.
/// </summary>
public readonly record struct SourceRun(long Offset, long End, bool IsZero)
{
    public long Length => End - Offset;
}

/// <summary>
/// Copies ranges of a source node to a target node under a copy bitmap (QEMU's block/block-copy.c), for
/// the copy-before-write filter (guest copies, before a guest write changes the data) and the backup job
/// (background copies over what is left). The copy bitmap (anonymous, on the source) says what is still to
/// copy, one bit per cluster of max(64 KiB, target cluster, min-cluster-size) as QEMU's, or per smaller
/// block (<see cref="BlockCopyOptions.GuestCopiesAtWriteSize"/>): then a 4 KiB guest write into a 64 KiB
/// cluster reads and writes 4 KiB, not 64 (QEMU copies the cluster). A copy claims its clusters
/// (clears their bits) under a lock and records them in flight; a guest write to a claimed cluster waits
/// for that copy, so each cluster is copied once. A claim is at most one chunk, so a guest zero-write over
/// gigabytes holds bounded buffers. A claim lasts until the old data is in memory, not until it is on the
/// target: when the owner allows it, a guest copy hands the target write to the background (at most 64 MiB
/// held; beyond that it writes inline). Chunks that read as zeros become write-zeroes, skipped where a
/// target without backing already reads as zeros; data clusters can go compressed. A failed copy puts its
/// bits back.
/// </summary>
public sealed class BlockCopy : IDisposable
{
    private const int DefaultChunk = 1 << 20;
    private const int MaxChunkCap = 64 << 20;

    /// <summary>Old data held in memory for deferred guest copies; beyond it a guest write waits for its copy.</summary>
    private const long MaxDeferredBytes = 64 << 20;

    private readonly BlockNode _source;
    private readonly BlockNode _target;
    /// <summary>The copy bitmap as the node lists it (query-block): QEMU's, one bit per cluster.</summary>
    private readonly DirtyBitmap _copyBitmap;
    /// <summary>What is still to copy, one bit per <see cref="_grain"/>: the listed bitmap's bits, or finer ones of its own.</summary>
    private readonly HBitmap _copy;
    /// <summary>The listed bitmap while <see cref="_copy"/> is finer: a cluster is dirty there while any block of it is.</summary>
    private readonly HBitmap? _shown;
    private readonly long _cluster;
    /// <summary>The copy bitmap's granularity: the cluster, or a fraction of it for guest copies at write size.</summary>
    private readonly long _grain;
    private readonly int _maxChunk;
    private readonly bool _compress;
    private readonly bool _discardSource;
    /// <summary>The target has no backing node, so where it reads as zeros nothing below can show through.</summary>
    private readonly bool _targetReadsZeroInit;
    private readonly Lock _claim = new();
    private readonly List<InFlight> _inFlight = [];
    private int _inFlightCount;
    private IBlockCopyOwner? _owner;
    private volatile bool _guestCopiesOff;
    /// <summary>Guest copies never defer their target write (a snapshot reader reads the target).</summary>
    private bool _inlineOnly;
    /// <summary>When a guest copy was last asked for (Environment.TickCount64).</summary>
    private long _lastGuestWrite = long.MinValue / 2;
    /// <summary>Guest copies whose target write runs after the guest write went on, and their bytes (under _claim).</summary>
    private int _deferred;
    private long _deferredBytes;
    private TaskCompletionSource? _deferredDrained;
    /// <summary>The first deferred target write that failed for good: the owner fails with it.</summary>
    private Exception? _deferredFailure;
    private bool _disposed;
    private bool _stopped;

    /// <summary>
    /// A copy state from <paramref name="source"/> to <paramref name="target"/>: everything is to copy, or
    /// only what <paramref name="bitmap"/> marks (QEMU's block_copy_state_new with a bitmap).
    /// </summary>
    public BlockCopy(BlockNode source, BlockNode target, BlockCopyOptions? options = null, HBitmap? bitmap = null)
    {
        ArgumentNullException.ThrowIfNull(source);
        ArgumentNullException.ThrowIfNull(target);
        options ??= new BlockCopyOptions();
        CheckMinClusterSize((ulong)options.MinClusterSize);
        _source = source;
        _target = target;
        _cluster = ClusterSizeFor(target, options.MinClusterSize);
        _maxChunk = (int)Math.Max(_cluster, options.MaxChunk > 0 ? Math.Min(options.MaxChunk, MaxChunkCap) : DefaultChunk);
        _maxChunk -= (int)(_maxChunk % _cluster);
        _compress = options.Compress;
        _discardSource = options.DiscardSource;
        _guestCopiesOff = options.StartInactive;
        _targetReadsZeroInit = !target.Children.Any(c => c.Role == "backing");
        _grain = options.GuestCopiesAtWriteSize && _targetReadsZeroInit && !_compress
            ? GuestCopyGrainFor(_cluster, source.Length)
            : _cluster;
        _copyBitmap = source.GetDirtyBitmaps().CreateAnonymous(_cluster, enabled: false);
        if (_grain < _cluster)
        {
            _copy = new HBitmap(source.Length, System.Numerics.BitOperations.Log2((ulong)_grain));
            _shown = _copyBitmap.Bits;
        }
        else
        {
            _copy = _copyBitmap.Bits;
        }
        if (bitmap is null)
        {
            _copy.SetAll();
            _shown?.SetAll();
        }
        else
        {
            SetDirtyFrom(bitmap);
        }
    }

    /// <summary>
    /// QEMU's checks of min-cluster-size (block_copy_state_new): it becomes the copy bitmap's granularity,
    /// so a power of two that a signed 64-bit size holds (QAPI's size is unsigned).
    /// </summary>
    public static void CheckMinClusterSize(ulong minClusterSize)
    {
        if (minClusterSize > long.MaxValue)
        {
            throw new BlockException($"min-cluster-size too large: {minClusterSize} > {long.MaxValue}");
        }
        if (minClusterSize != 0 && !ulong.IsPow2(minClusterSize))
        {
            throw new BlockException("min-cluster-size needs to be a power of 2");
        }
    }

    /// <summary>
    /// The block a guest copy at write size saves: 1/16 of the cluster, at least 4 KiB (the page, and the
    /// size of most guest writes), grown for disks so large that the copy bitmap would pass 4 MiB.
    /// </summary>
    private static long GuestCopyGrainFor(long cluster, long length)
    {
        var grain = Math.Max(4096, cluster / 16);
        while (grain < cluster && length / grain > MaxGrainBits)
        {
            grain *= 2;
        }
        return grain;
    }

    /// <summary>The copy bitmap's bits at most, when it is finer than a cluster (4 MiB of bits).</summary>
    private const long MaxGrainBits = 1L << 25;

    /// <summary>The copy unit: max(64 KiB, the target's cluster size, min-cluster-size), as QEMU's block-copy.</summary>
    public static long ClusterSizeFor(BlockNode target, long minClusterSize = 0)
    {
        ArgumentNullException.ThrowIfNull(target);
        return Math.Max(Math.Max(65536, target.GetImageInfo().ClusterSize ?? 0), minClusterSize);
    }

    public BlockNode Source => _source;

    public BlockNode Target => _target;

    public long ClusterSize => _cluster;

    /// <summary>
    /// What one guest copy saves at least, and the copy bitmap's granularity: <see cref="ClusterSize"/>,
    /// or less with <see cref="BlockCopyOptions.GuestCopiesAtWriteSize"/>.
    /// </summary>
    public long GuestCopyGrain => _grain;

    /// <summary>The largest claim (whole clusters).</summary>
    public int MaxChunk => _maxChunk;

    /// <summary>
    /// What is still to copy. Read it freely; the owner's final decisions (bitmap completion) read it once
    /// no copy runs any more.
    /// </summary>
    public HBitmap CopyBitmap => _copy;

    /// <summary>Bytes still to copy (whole blocks of <see cref="GuestCopyGrain"/>).</summary>
    public long DirtyBytes => _copy.DirtyByteCount;

    /// <summary>When a guest write last asked for a copy (Environment.TickCount64).</summary>
    public long LastGuestWriteTicks => Volatile.Read(ref _lastGuestWrite);

    /// <summary>The first deferred target write that failed for good, or null.</summary>
    public Exception? DeferredFailure => Volatile.Read(ref _deferredFailure);

    /// <summary>Gives the copy an owner (the backup job); set once, before any copy runs.</summary>
    public void Attach(IBlockCopyOwner owner)
    {
        ArgumentNullException.ThrowIfNull(owner);
        if (Interlocked.CompareExchange(ref _owner, owner, null) is not null)
        {
            throw new InvalidOperationException("the block copy already has an owner");
        }
    }

    /// <summary>Lets guest writes copy (for a copy made with <see cref="BlockCopyOptions.StartInactive"/>), unless stopped since.</summary>
    public void Activate()
    {
        lock (_claim)
        {
            if (!_disposed && !_stopped)
            {
                _guestCopiesOff = false;
            }
        }
    }

    /// <summary>Makes the copy bitmap the clusters <paramref name="bitmap"/> (any granularity) marks.</summary>
    public void SetDirtyFrom(HBitmap bitmap)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        lock (_claim)
        {
            _copy.Clear();
            _shown?.Clear();
            foreach (var e in bitmap.DirtyExtents())
            {
                // Whole clusters, as QEMU: an incremental target without backing may be rebased onto the
                // previous backup later, and a cluster it holds must then hold all of its data.
                var start = e.Offset / _cluster * _cluster;
                MarkDirty(start, Math.Min(RoundUp(e.End, _cluster), _copy.Size) - start);
            }
        }
    }

    /// <summary>Nothing to copy in [offset, offset + length) any more (whole blocks of <see cref="GuestCopyGrain"/>; claimed ones are already clear).</summary>
    public void Reset(long offset, long length)
    {
        lock (_claim)
        {
            MarkClean(offset, length);
        }
    }

    /// <summary>The next run still to copy at or after <paramref name="offset"/>, within <paramref name="length"/> bytes.</summary>
    public BitmapExtent? NextDirtyExtent(long offset, long length) => _copy.NextDirtyExtent(offset, length);

    /// <summary>
    /// True when nothing is left: nothing dirty, nothing being read, nothing being written in the background.
    /// Otherwise <paramref name="pending"/> completes when something changed (a copy in flight ended, or the
    /// deferred writes drained), or is null when there are dirty bits to copy now.
    /// </summary>
    public bool IsIdle(out Task? pending)
    {
        lock (_claim)
        {
            pending = null;
            if (_copy.NextDirty(0, _copy.Size) >= 0)
            {
                return false;
            }
            if (_inFlight.Count > 0)
            {
                pending = Task.WhenAny(_inFlight.Select(f => f.Done.Task));
                return false;
            }
            if (_deferred > 0)
            {
                pending = DeferredDrainedLocked();
                return false;
            }
            return true;
        }
    }

    // ------------------------------------------------------------------ copies

    /// <summary>
    /// A background copy of the still-dirty clusters of [start, end) (start aligned to <see cref="GuestCopyGrain"/>). Errors go to
    /// the owner's policy. Returns the bytes this call copied.
    /// </summary>
    public ValueTask<long> CopyAsync(long start, long end) => CopyRangeAsync(start, end, background: true, knownData: false);

    /// <summary>
    /// As <see cref="CopyAsync"/>, for a range <see cref="ProbeAsync"/> found to hold data: the source is
    /// not asked again (clusters still dirty have not changed since: a guest write would have copied them).
    /// </summary>
    public ValueTask<long> CopyDataAsync(long start, long end) => CopyRangeAsync(start, end, background: true, knownData: true);

    /// <summary>
    /// The source's block status for the whole of [start, end) in one call (start aligned to
    /// <see cref="GuestCopyGrain"/>), cut at a cluster boundary: the run at <paramref name="start"/> that reads as zeros or holds data. A run shorter
    /// than a cluster, or an error, gives one data cluster (the read then meets the error under the
    /// owner's policy), as QEMU's block_copy_block_status. The answer stays true for the clusters still
    /// dirty when a copy claims them: any write to them since went through copy-before-write first.
    /// </summary>
    public async ValueTask<SourceRun> ProbeAsync(long start, long end)
    {
        var length = _source.Length;
        end = Math.Min(end, length);
        try
        {
            var st = await _source.GetBlockStatusAsync(start, end - start).ConfigureAwait(false);
            // Whole clusters: a run may start inside one that guest copies saved in part.
            var runEnd = start + st.Length >= end ? end : (start + st.Length) / _cluster * _cluster;
            if (runEnd > start)
            {
                return new SourceRun(start, runEnd, st.IsZero);
            }
        }
#pragma warning disable CA1031 // As QEMU: block status is only a hint; the copy reports real I/O errors.
        catch (Exception) when (_owner is not { IsCancelled: true })
#pragma warning restore CA1031
        {
        }
        return new SourceRun(start, Math.Min(end, RoundUp(start + 1, _cluster)), IsZero: false);
    }

    /// <summary>
    /// A background copy of a run <see cref="ProbeAsync"/> found to read as zeros: claims what is still
    /// dirty in it at once (nothing is read, however long the run), makes the target read zeros there
    /// (nothing to do where a target without backing already does, write-zeroes elsewhere) and counts the
    /// whole run as copied. Returns the bytes copied.
    /// </summary>
    public async ValueTask<long> CopyZeroesAsync(long start, long end)
    {
        var length = _source.Length;
        List<InFlight> mine = [];
        lock (_claim)
        {
            var pos = start;
            while (pos < end && _copy.NextDirtyExtent(pos, end - pos) is { } e)
            {
                var f = new InFlight(e.Offset, e.End);
                _inFlight.Add(f);
                Volatile.Write(ref _inFlightCount, _inFlight.Count);
                MarkClean(e.Offset, e.Length);
                mine.Add(f);
                pos = e.End;
            }
        }
        var total = 0L;
        var targetZeroEnd = start;
        try
        {
            foreach (var f in mine)
            {
                var runEnd = Math.Min(f.End, length);
                // Nothing to read: the old data is known, so writers need not wait for the target.
                Release(f, putBack: false);
                try
                {
                    targetZeroEnd = await WriteZeroRunAsync(f.Start, runEnd - f.Start, targetZeroEnd, background: true).ConfigureAwait(false);
                }
                catch
                {
                    PutBack(f.Start, f.End);
                    throw;
                }
                await DiscardSourceAsync(f.Start, runEnd).ConfigureAwait(false);
                _owner?.OnProgress(runEnd - f.Start, guestCopy: false);
                total += runEnd - f.Start;
            }
        }
        finally
        {
            foreach (var f in mine)
            {
                Release(f, putBack: true);
            }
        }
        return total;
    }

    /// <summary>
    /// Saves the old data of the clusters (or blocks of <see cref="GuestCopyGrain"/>) under [offset,
    /// offset + length) before a guest write changes them (copy-before-write). Completes once that data is
    /// safe: on the target, or in memory with a deferred target write. Throws when the copy failed (its
    /// blocks stay to copy).
    /// </summary>
    public ValueTask CopyBeforeWriteAsync(long offset, long length)
    {
        if (_guestCopiesOff || length <= 0)
        {
            return ValueTask.CompletedTask;
        }
        // Only when the millisecond changed: every guest write passes here, and a store dirties the cache line.
        var now = Environment.TickCount64;
        if (Volatile.Read(ref _lastGuestWrite) != now)
        {
            Volatile.Write(ref _lastGuestWrite, now);
        }
        var end = Math.Min(RoundUp(offset + length, _grain), _copy.Size);
        // Bits are cleared when a copy claims them, before it is done: also look at copies in flight.
        if (offset >= end || (_copy.NextDirty(offset, end - offset) < 0 && Volatile.Read(ref _inFlightCount) == 0))
        {
            return ValueTask.CompletedTask;
        }
        var start = offset / _grain * _grain;
        return new ValueTask(CopyRangeAsync(start, end, background: false, knownData: false).AsTask());
    }

    /// <summary>
    /// No guest copies from now on; completes when the copies in flight and the deferred target writes
    /// have ended. The owner's own copies are its to stop.
    /// </summary>
    public async Task StopGuestCopiesAsync()
    {
        Task[] pending;
        lock (_claim)
        {
            _guestCopiesOff = true;
            _stopped = true;
            pending = [.. _inFlight.Select(f => f.Done.Task)];
        }
        await Task.WhenAll(pending).ConfigureAwait(false);
        await DeferredDrained().ConfigureAwait(false);
    }

    /// <summary>Marks [start, end) to copy again (a failed copy of the owner's).</summary>
    public void PutBack(long start, long end)
    {
        lock (_claim)
        {
            MarkDirty(start, Math.Min(end, _copy.Size) - start);
        }
    }

    private static long RoundUp(long v, long a) => (v + a - 1) / a * a;

    /// <summary>[offset, offset + length) is to copy (again). Under _claim, or before the copy is shared.</summary>
    private void MarkDirty(long offset, long length)
    {
        _copy.Set(offset, length);
        _shown?.Set(offset, length);
    }

    /// <summary>
    /// [offset, offset + length) is claimed or needs no copy. The listed bitmap drops the clusters now clean:
    /// those inside the range, and the two at its ends once no block of theirs is left. Under _claim.
    /// </summary>
    private void MarkClean(long offset, long length)
    {
        _copy.Reset(offset, length);
        if (_shown is null || length <= 0)
        {
            return;
        }
        var end = offset + length;
        ShowIfClean(offset / _cluster * _cluster);
        ShowIfClean((end - 1) / _cluster * _cluster);
        var inner = RoundUp(offset, _cluster);
        var innerEnd = end / _cluster * _cluster;
        if (innerEnd > inner)
        {
            _shown.Reset(inner, innerEnd - inner);
        }
    }

    private void ShowIfClean(long cluster)
    {
        var n = Math.Min(_cluster, _copy.Size - cluster);
        if (_copy.NextDirty(cluster, n) < 0)
        {
            _shown!.Reset(cluster, n);
        }
    }

    /// <summary>
    /// A run of clusters being read for a copy: its bits are already clear; writers to it wait for
    /// <see cref="Done"/>, which is set once its old data is safe (read into memory) or the copy ended.
    /// </summary>
    private sealed class InFlight(long start, long end)
    {
        public long Start { get; } = start;
        public long End { get; } = end;
        public bool Released { get; set; }
        public TaskCompletionSource Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    /// <summary>
    /// Copies the still-dirty clusters of [start, end): claims them, copies, and waits for copies of the
    /// range others have in flight. A failed copy puts its bits back. Returns the bytes this call copied
    /// (or handed to a deferred write).
    /// </summary>
    private async ValueTask<long> CopyRangeAsync(long start, long end, bool background, bool knownData)
    {
        var total = 0L;
        while (true)
        {
            var mine = new List<InFlight>();
            // Only allocated when another copy overlaps (rare for background copies, which take disjoint ranges).
            List<Task>? others = null;
            lock (_claim)
            {
                if (!background && _guestCopiesOff)
                {
                    return total;
                }
                foreach (var f in _inFlight)
                {
                    if (f.Start < end && f.End > start)
                    {
                        (others ??= []).Add(f.Done.Task);
                    }
                }
                var pos = start;
                while (pos < end && _copy.NextDirtyExtent(pos, end - pos) is { } e)
                {
                    // One claim is one buffer: a guest zero or discard may span gigabytes.
                    var claimEnd = Math.Min(e.End, e.Offset + _maxChunk);
                    var f = new InFlight(e.Offset, claimEnd);
                    _inFlight.Add(f);
                    Volatile.Write(ref _inFlightCount, _inFlight.Count);
                    MarkClean(e.Offset, claimEnd - e.Offset);
                    mine.Add(f);
                    pos = claimEnd;
                }
            }
            try
            {
                foreach (var f in mine)
                {
                    total += await CopyClaimedAsync(f, background, knownData).ConfigureAwait(false);
                }
            }
            finally
            {
                // What a failure left unread goes back to the copy bitmap (no-op for what ended).
                foreach (var f in mine)
                {
                    Release(f, putBack: true);
                }
            }
            if (others is null)
            {
                return total;
            }
            await Task.WhenAll(others).ConfigureAwait(false);
            if (background)
            {
                return total;
            }
            // A guest write: check again, another copy of the range may have failed before reading.
        }
    }

    /// <summary>
    /// Copies one claimed run: reads its old data, then writes it to the target. Writers waiting for the
    /// run may go on as soon as the data is in memory when the write that follows cannot lose it: the
    /// owner's copies and deferred guest copies write under the owner's error policy (retry, or the owner
    /// fails and keeps the bits). A guest copy that cannot be deferred (no owner that allows it, or the
    /// memory cap) writes inline, and a failure fails the guest write with its data untouched.
    /// </summary>
    private async ValueTask<long> CopyClaimedAsync(InFlight f, bool background, bool knownData)
    {
        var length = _source.Length;
        var end = Math.Min(f.End, length);
        var size = (int)(end - f.Start);
        var buffer = ArrayPool<byte>.Shared.Rent(size);
        var handedOff = false;
        try
        {
            var zeros = await CaptureAsync(f.Start, end, length, buffer, background, knownData).ConfigureAwait(false);
            if (background)
            {
                Release(f, putBack: false);
                try
                {
                    await WriteCapturedAsync(f.Start, end, buffer, zeros, background: true).ConfigureAwait(false);
                }
                catch
                {
                    // The owner fails (or was cancelled): a bitmap-mode=always bitmap must keep these bits.
                    PutBack(f.Start, f.End);
                    throw;
                }
                await DiscardSourceAsync(f.Start, end).ConfigureAwait(false);
                _owner?.OnProgress(size, guestCopy: false);
                return size;
            }
            if (TryReserveDeferred(size))
            {
                handedOff = true;
                _ = WriteDeferredAsync(f.Start, f.End, size, buffer, zeros);
                Release(f, putBack: false);
                return size;
            }
            await WriteCapturedAsync(f.Start, end, buffer, zeros, background: false).ConfigureAwait(false);
            _owner?.OnProgress(size, guestCopy: true);
            Release(f, putBack: false);
            return size;
        }
        finally
        {
            if (!handedOff)
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }
    }

    /// <summary>
    /// From now on a guest copy is done only once its data is on the target; completes when the deferred
    /// target writes already handed off have ended. A snapshot reader needs this: it reads saved clusters
    /// from the target.
    /// </summary>
    public Task KeepGuestCopiesInlineAsync()
    {
        lock (_claim)
        {
            _inlineOnly = true;
            return DeferredDrainedLocked();
        }
    }

    /// <summary>
    /// discard-source: the range is on the target, the source may let it go. A failed discard changes
    /// nothing the copy promised (QEMU ignores it too); a source opened with discard=ignore ignores it.
    /// </summary>
    private async ValueTask DiscardSourceAsync(long start, long end)
    {
        if (!_discardSource || end <= start)
        {
            return;
        }
        try
        {
            await _source.DiscardAsync(start, end - start).ConfigureAwait(false);
        }
#pragma warning disable CA1031 // A discard is a hint; the copy itself succeeded.
        catch (Exception)
#pragma warning restore CA1031
        {
        }
    }

    /// <summary>Counts a deferred guest copy against the memory cap; false when it would exceed it or the owner does not defer.</summary>
    private bool TryReserveDeferred(int size)
    {
        if (_owner is not { DeferGuestCopies: true })
        {
            return false;
        }
        lock (_claim)
        {
            if (_deferredBytes + size > MaxDeferredBytes || _guestCopiesOff || _inlineOnly)
            {
                return false;
            }
            _deferredBytes += size;
            _deferred++;
            return true;
        }
    }

    /// <summary>
    /// The target write of a guest copy whose data is already in memory, run after the guest write went
    /// on. It follows the owner's error policy; when it fails for good, <see cref="DeferredFailure"/> holds
    /// the error and the run's bits go back to the copy bitmap, so a bitmap-mode=always bitmap keeps them.
    /// </summary>
    private async Task WriteDeferredAsync(long start, long clusterEnd, int size, byte[] buffer, List<(long Offset, long Length)>? zeros)
    {
        var end = start + size;
        try
        {
            // Let the guest write go on now, whatever the target write does synchronously.
            await Task.Yield();
            await WriteCapturedAsync(start, end, buffer, zeros, background: true).ConfigureAwait(false);
            _owner?.OnProgress(size, guestCopy: true);
        }
#pragma warning disable CA1031 // Recorded and reported as the owner's failure.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            // One step: the owner's loop must not see the bits back without the failure and copy the
            // chunk again from a source the guest has changed since.
            lock (_claim)
            {
                if (_owner is not { IsCancelled: true })
                {
                    _deferredFailure ??= ex;
                }
                MarkDirty(start, clusterEnd - start);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
            TaskCompletionSource? drained = null;
            lock (_claim)
            {
                _deferredBytes -= size;
                if (--_deferred == 0)
                {
                    drained = _deferredDrained;
                    _deferredDrained = null;
                }
            }
            drained?.TrySetResult();
        }
    }

    /// <summary>Completes when no deferred guest copy is writing.</summary>
    private Task DeferredDrained()
    {
        lock (_claim)
        {
            return DeferredDrainedLocked();
        }
    }

    private Task DeferredDrainedLocked() => _deferred == 0
        ? Task.CompletedTask
        : (_deferredDrained ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).Task;

    /// <summary>Ends a claim: it no longer needs waiting for; with <paramref name="putBack"/>, its bits are dirty again.</summary>
    private void Release(InFlight f, bool putBack)
    {
        lock (_claim)
        {
            if (f.Released)
            {
                return;
            }
            f.Released = true;
            if (putBack)
            {
                MarkDirty(f.Start, f.End - f.Start);
            }
            _inFlight.Remove(f);
            Volatile.Write(ref _inFlightCount, _inFlight.Count);
        }
        f.Done.TrySetResult();
    }

    private bool Retries(Exception ex, bool background) =>
        background && _owner is { } o && (ex is not OperationCanceledException || !o.IsCancelled);

    /// <summary>
    /// Reads [start, end) into <paramref name="buffer"/> (at start's place) in chunks. A chunk the source
    /// reports as zeros (whole clusters, or up to the end of the disk) is not read: it is returned as a
    /// zero run instead (unless <paramref name="knownData"/>: the caller asked already). Read errors follow
    /// the owner's policy for background copies and fail a guest copy.
    /// </summary>
    private async ValueTask<List<(long Offset, long Length)>?> CaptureAsync(long start, long end, long length, byte[] buffer, bool background, bool knownData)
    {
        List<(long Offset, long Length)>? zeros = null;
        var pos = start;
        while (pos < end)
        {
            var max = (int)Math.Min(end - pos, _maxChunk);
            while (true)
            {
                var epoch = _owner?.ErrorEpoch ?? 0;
                try
                {
                    var st = knownData ? default : await _source.GetBlockStatusAsync(pos, max).ConfigureAwait(false);
                    if (st.IsZero && (st.Length >= _cluster || pos + st.Length >= length))
                    {
                        var run = pos + st.Length >= end ? end - pos : st.Length / _cluster * _cluster;
                        (zeros ??= []).Add((pos, run));
                        pos += run;
                    }
                    else
                    {
                        await _source.ReadForCopyAsync(pos, buffer.AsMemory((int)(pos - start), max)).ConfigureAwait(false);
                        pos += max;
                    }
                    break;
                }
                catch (Exception ex) when (Retries(ex, background))
                {
                    await _owner!.OnErrorAsync(ex, isRead: true, epoch).ConfigureAwait(false);
                }
            }
        }
        return zeros;
    }

    /// <summary>
    /// Writes what <see cref="CaptureAsync"/> read: zero runs as write-zeroes, and the data as runs of
    /// data clusters and runs of all-zero clusters (write-zeroes), so the target gets zero clusters, not data.
    /// </summary>
    private async ValueTask WriteCapturedAsync(long start, long end, byte[] buffer, List<(long Offset, long Length)>? zeros, bool background)
    {
        var pos = start;
        var z = 0;
        // The target is known to read as zeros on [pos, targetZeroEnd) (see WriteZeroRunAsync).
        var targetZeroEnd = pos;
        while (pos < end)
        {
            if (zeros is not null && z < zeros.Count && zeros[z].Offset == pos)
            {
                targetZeroEnd = await WriteZeroRunAsync(pos, zeros[z].Length, targetZeroEnd, background).ConfigureAwait(false);
                pos += zeros[z].Length;
                z++;
                continue;
            }
            var dataEnd = zeros is not null && z < zeros.Count ? zeros[z].Offset : end;
            var limit = (int)(dataEnd - start);
            var i = (int)(pos - start);
            while (i < limit)
            {
                var j = ClusterEnd(start, i, limit);
                var zero = IsZero(buffer, i, j);
                while (j < limit && j - i < _maxChunk && IsZero(buffer, j, ClusterEnd(start, j, limit)) == zero)
                {
                    j = ClusterEnd(start, j, limit);
                }
                if (zero)
                {
                    targetZeroEnd = await WriteZeroRunAsync(start + i, j - i, targetZeroEnd, background).ConfigureAwait(false);
                }
                else
                {
                    await WriteTargetAsync(start + i, buffer.AsMemory(i, j - i), j - i, background).ConfigureAwait(false);
                }
                i = j;
            }
            pos = dataEnd;
        }
    }

    /// <summary>
    /// Makes [offset, offset + length) read as zeros on the target. Where a target without a backing
    /// node already reads as zeros (a fresh image: nothing allocated), writing zero clusters would change
    /// nothing a reader sees but costs the target a metadata update each; those parts are skipped. The
    /// target's status is asked once per extent it reports within the run (never beyond it: a run is
    /// whole clusters, and asking for the rest of the disk each time would cost O(disk) per run), and
    /// stays valid while this copy runs: the range is claimed by it, and only this copy state writes there.
    /// Returns the new end of the range known to read as zeros on the target.
    /// </summary>
    private async ValueTask<long> WriteZeroRunAsync(long offset, long length, long targetZeroEnd, bool background)
    {
        var end = offset + length;
        while (offset < end)
        {
            if (_targetReadsZeroInit && offset >= targetZeroEnd)
            {
                var st = await _target.GetBlockStatusAsync(offset, end - offset).ConfigureAwait(false);
                targetZeroEnd = st.IsZero ? offset + st.Length : offset;
                if (targetZeroEnd == offset)
                {
                    // Not zero here: write zeroes up to where the target's next extent starts.
                    var n = Math.Min(end - offset, Math.Max(st.Length, 1));
                    await WriteTargetAsync(offset, null, n, background).ConfigureAwait(false);
                    offset += n;
                    continue;
                }
            }
            if (_targetReadsZeroInit && offset < targetZeroEnd)
            {
                offset = Math.Min(end, targetZeroEnd);
                continue;
            }
            await WriteTargetAsync(offset, null, end - offset, background).ConfigureAwait(false);
            return targetZeroEnd;
        }
        return targetZeroEnd;
    }

    private static bool IsZero(byte[] buffer, int from, int to) => buffer.AsSpan(from, to - from).IndexOfAnyExcept((byte)0) < 0;

    /// <summary>
    /// Where the target cluster holding buffer index <paramref name="i"/> ends (the buffer starts at disk
    /// offset <paramref name="start"/>, which a partly saved cluster leaves unaligned), at most <paramref name="limit"/>.
    /// </summary>
    private int ClusterEnd(long start, int i, int limit) => (int)Math.Min(limit, RoundUp(start + i + 1, _cluster) - start);

    /// <summary>Writes data (or zeros when <paramref name="data"/> is null) to the target under the error policy.</summary>
    private async ValueTask WriteTargetAsync(long offset, ReadOnlyMemory<byte>? data, long length, bool background)
    {
        while (true)
        {
            var epoch = _owner?.ErrorEpoch ?? 0;
            try
            {
                if (data is { } d && _compress)
                {
                    // Whole clusters of data go to the target deflated; zeros stay zero clusters (above).
                    await _target.WriteCompressedAsync(offset, d).ConfigureAwait(false);
                }
                else if (data is { } d2)
                {
                    await _target.WriteAsync(offset, d2).ConfigureAwait(false);
                }
                else
                {
                    await _target.WriteZeroesAsync(offset, length).ConfigureAwait(false);
                }
                return;
            }
            catch (Exception ex) when (Retries(ex, background))
            {
                await _owner!.OnErrorAsync(ex, isRead: false, epoch).ConfigureAwait(false);
            }
        }
    }

    /// <summary>Drops the copy bitmap. Call once no copy runs (after <see cref="StopGuestCopiesAsync"/> and the owner's copies ended).</summary>
    public void Dispose()
    {
        lock (_claim)
        {
            if (_disposed)
            {
                return;
            }
            _disposed = true;
            _guestCopiesOff = true;
        }
        _copyBitmap.Owner.Release(_copyBitmap);
    }
}
