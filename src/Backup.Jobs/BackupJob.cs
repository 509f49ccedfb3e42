using Backup.Block;
using Backup.Block.Bitmaps;

namespace Backup.Jobs;

/// <summary>What a backup copies (QAPI MirrorSyncMode after desugaring incremental and differential to bitmap).</summary>
public enum BackupSyncMode
{
    Full,
    Top,
    None,
    Bitmap,
}

/// <summary>Everything a backup job needs, already checked by <see cref="BackupStarter"/>.</summary>
public sealed record BackupSettings
{
    public required BlockNode Source { get; init; }
    public required BlockNode Target { get; init; }
    public required BackupSyncMode Sync { get; init; }
    public DirtyBitmap? Bitmap { get; init; }
    public BitmapSyncMode BitmapMode { get; init; }
    public string OnSourceError { get; init; } = "report";
    public string OnTargetError { get; init; } = "report";
    public int MaxChunk { get; init; }
    /// <summary>Write data compressed (the target supports it: checked before).</summary>
    public bool Compress { get; init; }
    /// <summary>Parallel copies of the job (x-perf max-workers); 0 for the default.</summary>
    public int MaxWorkers { get; init; }
    /// <summary>x-perf min-cluster-size: the copy unit is at least this (a power of two); 0 for none.</summary>
    public long MinClusterSize { get; init; }
    /// <summary>The copy-before-write filter node above the source while the job exists.</summary>
    public BlockNode? Filter { get; init; }
    /// <summary>Takes the filter out of the graph (when the job is cleaned up).</summary>
    public Action? RemoveFilter { get; init; }
    /// <summary>Called once the job no longer uses the target (drive-backup closes the node it opened).</summary>
    public Func<ValueTask>? ReleaseTarget { get; init; }
}

/// <summary>
/// QEMU's backup job. At creation the sync bitmap (if any) is frozen and a copy bitmap (anonymous,
/// one bit per cluster of max(64 KiB, target cluster)) says what is still to copy: everything (full,
/// none), the frozen bitmap's bits (bitmap), or what the top layer allocates (top). A write observer
/// on the source copies the old data of a chunk to the target before a guest write changes it
/// (copy-before-write), so the target is the source as it was when the job started. The job walks the
/// copy bitmap (except for none, which only serves copy-before-write until cancelled); zero chunks go
/// to the target as write-zeroes. A copy claims its clusters (clears their bits) under a lock and records them in flight; a guest
/// write to a claimed cluster waits for that copy, so each cluster is copied exactly once, by up to
/// eight copies in parallel.
/// </summary>
// CA1001: the SemaphoreSlim's wait handle is never created, so there is nothing to dispose.
#pragma warning disable CA1001
public sealed class BackupJob : Job, IWriteObserver
#pragma warning restore CA1001
{
    public const string BusyReason = "block device is in use by block job: backup";
    private const int DefaultChunk = 1 << 20;
    private const int DefaultWorkers = 8;
    private const int MaxWorkersCap = 64;
    /// <summary>Old data held in memory for deferred guest copies; beyond it a guest write waits for its copy.</summary>
    private const long MaxDeferredBytes = 64 << 20;
    /// <summary>A guest that wrote within this many milliseconds is writing: the job copies with fewer workers.</summary>
    private const long GuestActiveMillis = 20;
    private const int GuestActiveWorkers = 1;

    private readonly BackupSettings _s;
    private readonly DirtyBitmap _copyBitmap;
    private readonly HBitmap _copy;
    private readonly long _cluster;
    private readonly int _maxChunk;
    private readonly int _workers;
    private readonly Lock _claim = new();
    private readonly List<InFlight> _inFlight = [];
    private int _inFlightCount;
    private readonly SemaphoreSlim _errorGate = new(1, 1);
    private int _errorEpoch;
    private bool _failed;
    private readonly IDisposable _targetUser;
    /// <summary>The target has no backing node, so where it reads as zeros nothing below can show through.</summary>
    private readonly bool _targetReadsZeroInit;
    private volatile bool _cbwOff;
    /// <summary>When the guest last wrote to the source (Environment.TickCount64), for <see cref="WorkersNow"/>.</summary>
    private long _lastGuestWrite = long.MinValue / 2;
    /// <summary>Guest copies whose target write runs after the guest write went on, and their bytes (under _claim).</summary>
    private int _deferred;
    private long _deferredBytes;
    private TaskCompletionSource? _deferredDrained;
    /// <summary>The first deferred target write that failed for good: the job fails with it.</summary>
    private Exception? _deferredFailure;
    private bool _cleaned;

    public BackupJob(JobManager manager, JobSettings settings, BackupSettings backup) : base(manager, settings)
    {
        ArgumentNullException.ThrowIfNull(backup);
        _s = backup;
        _cluster = Math.Max(ClusterSize(backup.Target), backup.MinClusterSize);
        _maxChunk = (int)Math.Max(_cluster, backup.MaxChunk > 0 ? Math.Min(backup.MaxChunk, 64 << 20) : DefaultChunk);
        _maxChunk -= (int)(_maxChunk % _cluster);
        _workers = backup.MaxWorkers > 0 ? Math.Min(backup.MaxWorkers, MaxWorkersCap) : DefaultWorkers;
        var set = backup.Source.GetDirtyBitmaps();
        if (backup.Bitmap is { } bitmap)
        {
            set.Freeze(bitmap);
        }
        _copyBitmap = set.CreateAnonymous(_cluster, enabled: false);
        _copy = _copyBitmap.Bits;
        if (backup.Sync == BackupSyncMode.Bitmap)
        {
            foreach (var e in backup.Bitmap!.Bits.DirtyExtents())
            {
                _copy.Set(e.Offset, e.Length);
            }
        }
        else
        {
            _copy.SetAll();
        }
        // sync=none too: QEMU estimates the whole copy bitmap, and copy-before-write copies advance it.
        SetProgressTotal(_copy.DirtyByteCount);
        _targetReadsZeroInit = !backup.Target.Children.Any(c => c.Role == "backing");
        _targetUser = backup.Target.AddJobTarget(BusyReason);
        backup.Source.AddWriteObserver(this);
    }

    public override string Type => "backup";

    public BlockNode Source => _s.Source;

    public BlockNode Target => _s.Target;

    /// <summary>The copy unit: max(64 KiB, the target's cluster size), as QEMU's block-copy.</summary>
    public static long ClusterSize(BlockNode target)
    {
        ArgumentNullException.ThrowIfNull(target);
        return Math.Max(65536, target.GetImageInfo().ClusterSize ?? 0);
    }

    protected override async Task RunAsync(CancellationToken cancellationToken)
    {
        await PausePointAsync().ConfigureAwait(false);
        if (_s.Sync == BackupSyncMode.None)
        {
            while (true)
            {
                await SleepAsync(Timeout.InfiniteTimeSpan).ConfigureAwait(false);
                await PausePointAsync().ConfigureAwait(false);
            }
        }
        if (_s.Sync == BackupSyncMode.Top)
        {
            await SkipUnallocatedAsync().ConfigureAwait(false);
        }
        var offset = 0L;
        var length = _s.Source.Length;
        var running = new List<Task<long>>();
        try
        {
            while (true)
            {
                await PausePointAsync().ConfigureAwait(false);
                ThrowIfDeferredFailed();
                var extent = offset < length ? _copy.NextDirtyExtent(offset, length - offset) : null;
                if (extent is { } e && running.Count < WorkersNow())
                {
                    var end = Math.Min(e.End, Math.Min(length, e.Offset + _maxChunk));
                    running.Add(CopyAsync(e.Offset, end, fromJob: true).AsTask());
                    offset = end;
                    continue;
                }
                if (running.Count == 0)
                {
                    // Guest copies still reading or writing may yet fail and put bits back: wait for
                    // them, then look again (copies that failed and were retried may have put bits back).
                    Task? pending = null;
                    var idle = false;
                    lock (_claim)
                    {
                        // Decided under the lock: nothing dirty, nothing being read, nothing being written.
                        if (_copy.NextDirty(0, length) < 0)
                        {
                            idle = _inFlight.Count == 0 && _deferred == 0;
                            pending = _inFlight.Count > 0 ? Task.WhenAny(_inFlight.Select(f => f.Done.Task))
                                : idle ? null : DeferredDrainedLocked();
                        }
                    }
                    if (idle)
                    {
                        break;
                    }
                    if (pending is not null)
                    {
                        await pending.WaitAsync(cancellationToken).ConfigureAwait(false);
                    }
                    offset = 0;
                    continue;
                }
                var done = await Task.WhenAny(running).ConfigureAwait(false);
                running.Remove(done);
                var copied = await done.ConfigureAwait(false);
                await RateLimitAsync(copied).ConfigureAwait(false);
            }
        }
        finally
        {
            // Let the copies in flight end before the job reports anything.
            try
            {
                await Task.WhenAll(running).ConfigureAwait(false);
            }
#pragma warning disable CA1031 // The first failure is the one reported; the others only need to end.
            catch (Exception)
#pragma warning restore CA1031
            {
            }
        }
    }

    /// <summary>
    /// The job's parallel copies: all of them while the guest is quiet, one while it writes. The guest's
    /// writes, the NBD server and the job share the machine's CPUs and page cache; a backup that takes
    /// longer costs the user less than a guest that stalls, and copy-before-write keeps it exact either way.
    /// </summary>
    private int WorkersNow() =>
        Environment.TickCount64 - Volatile.Read(ref _lastGuestWrite) < GuestActiveMillis ? GuestActiveWorkers : _workers;

    /// <summary>sync=top: clears the bits of what the source's top layer does not allocate.</summary>
    private async Task SkipUnallocatedAsync()
    {
        var length = _s.Source.Length;
        var pos = 0L;
        while (pos < length)
        {
            var st = await _s.Source.GetBlockStatusAsync(pos, length - pos).ConfigureAwait(false);
            var n = st.Length > 0 ? st.Length : length - pos;
            if (!st.IsAllocated)
            {
                // Only whole clusters that are entirely unallocated.
                var start = RoundUp(pos, _cluster);
                var end = n == length - pos ? RoundUp(pos + n, _cluster) : (pos + n) / _cluster * _cluster;
                if (end > start)
                {
                    lock (_claim)
                    {
                        // Only what no copy has claimed yet: claimed clusters are already clear.
                        _copy.Reset(start, end - start);
                    }
                }
            }
            pos += n;
        }
        SetProgressTotal(_copy.DirtyByteCount);
    }

    private static long RoundUp(long v, long a) => (v + a - 1) / a * a;

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
    /// Copies the still-dirty clusters of [start, end) (cluster-aligned start): claims them (clears their
    /// bits, records them in flight), copies, and waits for copies of the range others have in flight.
    /// A failed copy puts its bits back. Returns the bytes this call copied (or handed to a deferred write).
    /// </summary>
    private async ValueTask<long> CopyAsync(long start, long end, bool fromJob)
    {
        var total = 0L;
        while (true)
        {
            var mine = new List<InFlight>();
            // Only allocated when another copy overlaps (rare for the job's own copies, which take disjoint ranges).
            List<Task>? others = null;
            lock (_claim)
            {
                if (!fromJob && _cbwOff)
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
                    _copy.Reset(e.Offset, claimEnd - e.Offset);
                    mine.Add(f);
                    pos = claimEnd;
                }
            }
            try
            {
                foreach (var f in mine)
                {
                    total += await CopyClaimedAsync(f, fromJob).ConfigureAwait(false);
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
            if (fromJob)
            {
                return total;
            }
            // A guest write: check again, another copy of the range may have failed before reading.
        }
    }

    /// <summary>
    /// Copies one claimed run: reads its old data, then writes it to the target. Writers waiting for the
    /// run may go on as soon as the data is in memory when the write that follows cannot lose it: the
    /// job's own copies and deferred guest copies write under the job's error policy (retry, or the job
    /// fails and the sync bitmap keeps the bits). A guest copy that cannot be deferred (memory cap, or
    /// sync=none, where nothing else reports target errors) writes inline, and a failure fails the guest
    /// write with its data untouched.
    /// </summary>
    private async ValueTask<long> CopyClaimedAsync(InFlight f, bool fromJob)
    {
        var length = _s.Source.Length;
        var end = Math.Min(f.End, length);
        var size = (int)(end - f.Start);
        var buffer = System.Buffers.ArrayPool<byte>.Shared.Rent(size);
        var handedOff = false;
        try
        {
            var zeros = await CaptureAsync(f.Start, end, length, buffer, fromJob).ConfigureAwait(false);
            if (fromJob)
            {
                Release(f, putBack: false);
                try
                {
                    await WriteCapturedAsync(f.Start, end, buffer, zeros, fromJob: true).ConfigureAwait(false);
                }
                catch
                {
                    // The job fails (or was cancelled): a bitmap-mode=always bitmap must keep these bits.
                    PutBack(f.Start, f.End);
                    throw;
                }
                AddProgress(size);
                return size;
            }
            if (_s.Sync != BackupSyncMode.None && TryReserveDeferred(size))
            {
                handedOff = true;
                _ = WriteDeferredAsync(f.Start, f.End, size, buffer, zeros);
                Release(f, putBack: false);
                return size;
            }
            await WriteCapturedAsync(f.Start, end, buffer, zeros, fromJob: false).ConfigureAwait(false);
            AddProgress(size);
            Release(f, putBack: false);
            return size;
        }
        finally
        {
            if (!handedOff)
            {
                System.Buffers.ArrayPool<byte>.Shared.Return(buffer);
            }
        }
    }

    /// <summary>Counts a deferred guest copy against the memory cap; false when it would exceed it.</summary>
    private bool TryReserveDeferred(int size)
    {
        lock (_claim)
        {
            if (_deferredBytes + size > MaxDeferredBytes || _cbwOff)
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
    /// on. It follows the job's error policy; when it fails for good, the job fails (see
    /// <see cref="ThrowIfDeferredFailed"/>) and the run's bits go back to the copy bitmap, so a
    /// bitmap-mode=always bitmap keeps them.
    /// </summary>
    private async Task WriteDeferredAsync(long start, long clusterEnd, int size, byte[] buffer, List<(long Offset, long Length)>? zeros)
    {
        var end = start + size;
        try
        {
            // Let the guest write go on now, whatever the target write does synchronously.
            await Task.Yield();
            await WriteCapturedAsync(start, end, buffer, zeros, fromJob: true).ConfigureAwait(false);
            AddProgress(size);
        }
#pragma warning disable CA1031 // Recorded and reported as the job's failure.
        catch (Exception ex)
#pragma warning restore CA1031
        {
            // One step: the job loop must not see the bits back without the failure and copy the
            // chunk again from a source the guest has changed since.
            lock (_claim)
            {
                if (!IsCancelled)
                {
                    _deferredFailure ??= ex;
                }
                _copy.Set(start, clusterEnd - start);
            }
        }
        finally
        {
            System.Buffers.ArrayPool<byte>.Shared.Return(buffer);
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

    private void ThrowIfDeferredFailed()
    {
        if (Volatile.Read(ref _deferredFailure) is { } failure)
        {
            throw failure as JobFailedException ?? new JobFailedException(Describe(failure), failure);
        }
    }

    private void PutBack(long start, long end)
    {
        lock (_claim)
        {
            _copy.Set(start, end - start);
        }
    }

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
                _copy.Set(f.Start, f.End - f.Start);
            }
            _inFlight.Remove(f);
            Volatile.Write(ref _inFlightCount, _inFlight.Count);
        }
        f.Done.TrySetResult();
    }

    /// <summary>
    /// Reads [start, end) into <paramref name="buffer"/> (at start's place) in chunks. A chunk the source
    /// reports as zeros (whole clusters, or up to the end of the disk) is not read: it is returned as a
    /// zero run instead. Read errors follow the job's policy for the job's copies and fail a guest copy.
    /// </summary>
    private async ValueTask<List<(long Offset, long Length)>?> CaptureAsync(long start, long end, long length, byte[] buffer, bool fromJob)
    {
        List<(long Offset, long Length)>? zeros = null;
        var pos = start;
        while (pos < end)
        {
            var max = (int)Math.Min(end - pos, _maxChunk);
            while (true)
            {
                var epoch = Volatile.Read(ref _errorEpoch);
                try
                {
                    var st = await _s.Source.GetBlockStatusAsync(pos, max).ConfigureAwait(false);
                    if (st.IsZero && (st.Length >= _cluster || pos + st.Length >= length))
                    {
                        var run = pos + st.Length >= end ? end - pos : st.Length / _cluster * _cluster;
                        (zeros ??= []).Add((pos, run));
                        pos += run;
                    }
                    else
                    {
                        await _s.Source.ReadAsync(pos, buffer.AsMemory((int)(pos - start), max)).ConfigureAwait(false);
                        pos += max;
                    }
                    break;
                }
                catch (Exception ex) when (fromJob && (ex is not OperationCanceledException || !IsCancelled))
                {
                    await OnErrorAsync(ex, isRead: true, epoch).ConfigureAwait(false);
                }
            }
        }
        return zeros;
    }

    /// <summary>
    /// Writes what <see cref="CaptureAsync"/> read: zero runs as write-zeroes, and the data as runs of
    /// data clusters and runs of all-zero clusters (write-zeroes), so the target gets zero clusters, not data.
    /// </summary>
    private async ValueTask WriteCapturedAsync(long start, long end, byte[] buffer, List<(long Offset, long Length)>? zeros, bool fromJob)
    {
        var pos = start;
        var z = 0;
        // The target is known to read as zeros on [pos, targetZeroEnd) (see WriteZeroRunAsync).
        var targetZeroEnd = pos;
        while (pos < end)
        {
            if (zeros is not null && z < zeros.Count && zeros[z].Offset == pos)
            {
                targetZeroEnd = await WriteZeroRunAsync(pos, zeros[z].Length, targetZeroEnd, fromJob).ConfigureAwait(false);
                pos += zeros[z].Length;
                z++;
                continue;
            }
            var dataEnd = zeros is not null && z < zeros.Count ? zeros[z].Offset : end;
            var limit = (int)(dataEnd - start);
            var i = (int)(pos - start);
            while (i < limit)
            {
                var zero = IsZero(buffer, i, limit);
                var j = i + (int)Math.Min(_cluster, limit - i);
                while (j < limit && j - i < _maxChunk && IsZero(buffer, j, limit) == zero)
                {
                    j += (int)Math.Min(_cluster, limit - j);
                }
                if (zero)
                {
                    targetZeroEnd = await WriteZeroRunAsync(start + i, j - i, targetZeroEnd, fromJob).ConfigureAwait(false);
                }
                else
                {
                    await WriteTargetAsync(start + i, buffer.AsMemory(i, j - i), j - i, fromJob).ConfigureAwait(false);
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
    /// target's status is asked once per extent it reports, and stays valid while this copy runs: the
    /// range is claimed by it, and the job holds the target (nothing else writes to it).
    /// Returns the new end of the range known to read as zeros on the target.
    /// </summary>
    private async ValueTask<long> WriteZeroRunAsync(long offset, long length, long targetZeroEnd, bool fromJob)
    {
        var end = offset + length;
        while (offset < end)
        {
            if (_targetReadsZeroInit && offset >= targetZeroEnd)
            {
                var st = await _s.Target.GetBlockStatusAsync(offset, _s.Target.Length - offset).ConfigureAwait(false);
                targetZeroEnd = st.IsZero ? offset + st.Length : offset;
                if (targetZeroEnd == offset)
                {
                    // Not zero here: write zeroes up to where the target's next extent starts.
                    var n = Math.Min(end - offset, Math.Max(st.Length, 1));
                    await WriteTargetAsync(offset, null, n, fromJob).ConfigureAwait(false);
                    offset += n;
                    continue;
                }
            }
            if (_targetReadsZeroInit && offset < targetZeroEnd)
            {
                offset = Math.Min(end, targetZeroEnd);
                continue;
            }
            await WriteTargetAsync(offset, null, end - offset, fromJob).ConfigureAwait(false);
            return targetZeroEnd;
        }
        return targetZeroEnd;
    }

    private bool IsZero(byte[] buffer, int offset, int limit) =>
        buffer.AsSpan(offset, (int)Math.Min(_cluster, limit - offset)).IndexOfAnyExcept((byte)0) < 0;

    /// <summary>Writes data (or zeros when <paramref name="data"/> is null) to the target under the error policy.</summary>
    private async ValueTask WriteTargetAsync(long offset, ReadOnlyMemory<byte>? data, long length, bool fromJob)
    {
        while (true)
        {
            var epoch = Volatile.Read(ref _errorEpoch);
            try
            {
                if (data is { } d && _s.Compress)
                {
                    // Whole clusters of data go to the target deflated; zeros stay zero clusters (below).
                    await _s.Target.WriteCompressedAsync(offset, d).ConfigureAwait(false);
                }
                else if (data is { } d2)
                {
                    await _s.Target.WriteAsync(offset, d2).ConfigureAwait(false);
                }
                else
                {
                    await _s.Target.WriteZeroesAsync(offset, length).ConfigureAwait(false);
                }
                return;
            }
            catch (Exception ex) when (fromJob && (ex is not OperationCanceledException || !IsCancelled))
            {
                await OnErrorAsync(ex, isRead: false, epoch).ConfigureAwait(false);
            }
        }
    }

    /// <summary>
    /// One error policy decision at a time, as QEMU's single job coroutine makes: parallel copies that
    /// fail together produce one BLOCK_JOB_ERROR. A copy whose error was met before another copy's
    /// error was handled (the epoch moved) just retries; after a reported error, every copy fails.
    /// </summary>
    private async ValueTask OnErrorAsync(Exception error, bool isRead, int epoch)
    {
        await _errorGate.WaitAsync().ConfigureAwait(false);
        try
        {
            // A cancelled job stops retrying (ignore, or stop then resumed, would retry forever); the
            // cancel may also have come while this copy queued behind a handler paused by 'stop'.
            if (IsCancelled)
            {
                throw new OperationCanceledException("job cancelled", error);
            }
            if (_failed)
            {
                throw new JobFailedException(Describe(error), error);
            }
            if (Volatile.Read(ref _errorEpoch) != epoch)
            {
                return;
            }
            try
            {
                await HandleErrorAsync(error, isRead, isRead ? _s.OnSourceError : _s.OnTargetError).ConfigureAwait(false);
            }
            catch (JobFailedException)
            {
                _failed = true;
                throw;
            }
            Interlocked.Increment(ref _errorEpoch);
        }
        finally
        {
            _errorGate.Release();
        }
    }

    protected override async ValueTask AfterRunAsync()
    {
        // No copy-before-write from now on; wait for one in flight.
        Task[] pending;
        lock (_claim)
        {
            _cbwOff = true;
            pending = [.. _inFlight.Select(f => f.Done.Task)];
        }
        await Task.WhenAll(pending).ConfigureAwait(false);
        await DeferredDrained().ConfigureAwait(false);
        _s.Source.RemoveWriteObserver(this);
        if (!IsCancelled)
        {
            ThrowIfDeferredFailed();
        }
    }

    protected override void Commit()
    {
        if (_s.Bitmap is { } b)
        {
            b.Owner.Complete(b, _s.BitmapMode, success: true, _copy);
        }
    }

    protected override void Abort()
    {
        if (_s.Bitmap is { } b)
        {
            b.Owner.Complete(b, _s.BitmapMode, success: false, _copy);
        }
    }

    protected override void Clean()
    {
        if (_cleaned)
        {
            return;
        }
        _cleaned = true;
        _cbwOff = true;
        _s.Source.RemoveWriteObserver(this);
        _copyBitmap.Owner.Release(_copyBitmap);
        _s.RemoveFilter?.Invoke();
        _targetUser.Dispose();
        if (_s.ReleaseTarget is { } release)
        {
            _ = Task.Run(async () => await release().ConfigureAwait(false));
        }
    }

    // ------------------------------------------------------------------ copy-before-write

    public ValueTask BeforeWriteAsync(BlockNode node, long offset, long length, WriteKind kind, CancellationToken cancellationToken)
    {
        if (_cbwOff || length <= 0)
        {
            return ValueTask.CompletedTask;
        }
        // Only when the millisecond changed: every guest write passes here, and a store dirties the cache line.
        var now = Environment.TickCount64;
        if (Volatile.Read(ref _lastGuestWrite) != now)
        {
            Volatile.Write(ref _lastGuestWrite, now);
        }
        var end = Math.Min(RoundUp(offset + length, _cluster), _copy.Size);
        // Bits are cleared when a copy claims them, before it is done: also look at copies in flight.
        if (offset >= end || (_copy.NextDirty(offset, end - offset) < 0 && Volatile.Read(ref _inFlightCount) == 0))
        {
            return ValueTask.CompletedTask;
        }
        var start = offset / _cluster * _cluster;
        return new ValueTask(CopyAsync(start, end, fromJob: false).AsTask());
    }

    public void AfterWrite(BlockNode node, long offset, long length, WriteKind kind)
    {
    }
}
