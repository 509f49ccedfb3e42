using Backup.Block;
using Backup.Block.Bitmaps;
using Backup.Block.Copy;
using Backup.Block.Drivers.CopyBeforeWrite;

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
    /// <summary>
    /// The copy-before-write filter above the source while the job exists, whose block copy the job
    /// drives; made by the job (outside any graph) when not given.
    /// </summary>
    public CopyBeforeWriteNode? Filter { get; init; }
    /// <summary>What a guest write sees when its copy fails, for the filter the job makes itself (a given <see cref="Filter"/> has its own).</summary>
    public OnCbwError OnCbwError { get; init; } = OnCbwError.BreakGuestWrite;
    /// <summary>Takes the filter out of the graph (when the job is cleaned up).</summary>
    public Action? RemoveFilter { get; init; }
    /// <summary>Called once the job no longer uses the target (drive-backup closes the node it opened).</summary>
    public Func<ValueTask>? ReleaseTarget { get; init; }
}


/// <summary>
/// QEMU's backup job: the loop that drives the copy-before-write filter's <see cref="BlockCopy"/> over
/// what is left to copy, the job's states and events, its error policy and speed, and the sync bitmap's
/// successor protocol at the end. At creation the sync bitmap (if any) is frozen and the block copy's
/// copy bitmap says what to copy: everything (full, none), the frozen bitmap's bits (bitmap), or what
/// the top layer allocates (top); only then may guest writes copy (the point in time). The filter's
/// copy-before-write keeps the target the source as it was then; the job walks the copy bitmap (except
/// for none, which only serves copy-before-write until cancelled) with up to 8 parallel copies, one
/// while the guest writes.
/// </summary>
// CA1001: the SemaphoreSlim's wait handle is never created, so there is nothing to dispose.
#pragma warning disable CA1001
public sealed class BackupJob : Job, IBlockCopyOwner
#pragma warning restore CA1001
{
    public const string BusyReason = "block device is in use by block job: backup";
    private const int DefaultWorkers = 8;
    private const int MaxWorkersCap = 64;
    /// <summary>A guest that wrote within this many milliseconds is writing: the job steps back.</summary>
    private const long GuestActiveMillis = 20;
    /// <summary>
    /// While the guest writes, the job starts one chunk this often and no more (about 20 MiB/s at the
    /// 1 MiB chunk, besides copy-before-write), so that a guest that never pauses cannot stall it.
    /// </summary>
    private const long GuestActiveChunkIntervalMillis = 50;

    private readonly BackupSettings _s;
    private readonly CopyBeforeWriteNode _filter;
    private readonly BlockCopy _copy;
    private readonly long _cluster;
    private readonly int _workers;
    private readonly SemaphoreSlim _errorGate = new(1, 1);
    private int _errorEpoch;
    private bool _failed;
    private readonly IDisposable _targetUser;
    private bool _cleaned;

    public BackupJob(JobManager manager, JobSettings settings, BackupSettings backup) : base(manager, settings)
    {
        ArgumentNullException.ThrowIfNull(backup);
        _s = backup;
        _workers = backup.MaxWorkers > 0 ? Math.Min(backup.MaxWorkers, MaxWorkersCap) : DefaultWorkers;
        _filter = backup.Filter ?? CreateOwnFilter(backup);
        _copy = _filter.BlockCopy;
        _cluster = _copy.ClusterSize;
        _copy.Attach(this);
        if (backup.Bitmap is { } bitmap)
        {
            backup.Source.GetDirtyBitmaps().Freeze(bitmap);
            if (backup.Sync == BackupSyncMode.Bitmap)
            {
                _copy.SetDirtyFrom(bitmap.Bits);
            }
        }
        // sync=none too: QEMU estimates the whole copy bitmap, and copy-before-write copies advance it.
        SetProgressTotal(_copy.DirtyBytes);
        _targetUser = backup.Target.AddJobTarget(BusyReason);
        _copy.Activate();
    }

    /// <summary>The block-copy options a backup's filter needs (the job activates guest copies itself).</summary>
    private static BlockCopyOptions CopyOptions(BackupSettings backup)
    {
        ArgumentNullException.ThrowIfNull(backup);
        return new BlockCopyOptions
        {
            MinClusterSize = backup.MinClusterSize,
            MaxChunk = backup.MaxChunk,
            Compress = backup.Compress,
            StartInactive = true,
            GuestCopiesAtWriteSize = backup.Sync != BackupSyncMode.None,
        };
    }

    /// <summary>A job started without a graph (unit tests, embedders) keeps its filter to itself.</summary>
    private static CopyBeforeWriteNode CreateOwnFilter(BackupSettings backup) =>
        new(new NodeContext
        {
            NodeName = "backup-top",
            IsImplicitName = true,
            ReadOnly = backup.Source.ReadOnly,
            Graph = new BlockGraph([]),
            Options = new BlockOptions(),
        }, backup.Source, backup.Target, new BlockCopy(backup.Source, backup.Target, CopyOptions(backup)), backup.OnCbwError);

    public override string Type => "backup";

    protected override string? NodeName => _s.Source.NodeName;

    protected override string Details =>
        $"sync {_s.Sync.ToString().ToLowerInvariant()} to node {_s.Target.NodeName}"
        + (_s.Bitmap is { } b ? $", bitmap {b.Name} ({BitmapModeName})" : "");

    private string BitmapModeName => _s.BitmapMode switch
    {
        BitmapSyncMode.OnSuccess => "on-success",
        BitmapSyncMode.Never => "never",
        _ => "always",
    };

    public BlockNode Source => _s.Source;

    public BlockNode Target => _s.Target;

    /// <summary>The copy-before-write filter the job drives.</summary>
    public CopyBeforeWriteNode Filter => _filter;

    /// <summary>The copy unit: max(64 KiB, the target's cluster size), as QEMU's block-copy.</summary>
    public static long ClusterSize(BlockNode target) => BlockCopy.ClusterSizeFor(target);

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
        var maxChunk = _copy.MaxChunk;
        var running = new List<Task<long>>();
        var lastGuestTimeChunk = long.MinValue / 2;
        try
        {
            while (true)
            {
                await PausePointAsync().ConfigureAwait(false);
                ThrowIfDeferredFailed();
                var extent = offset < length ? _copy.NextDirtyExtent(offset, length - offset) : null;
                if (extent is { } e)
                {
                    var now = Environment.TickCount64;
                    var writing = GuestIsWriting(now);
                    var due = lastGuestTimeChunk + GuestActiveChunkIntervalMillis;
                    if (writing ? running.Count == 0 && now >= due : running.Count < _workers)
                    {
                        if (writing)
                        {
                            lastGuestTimeChunk = now;
                        }
                        (var copy, offset) = await StartCopyAsync(e, length, maxChunk).ConfigureAwait(false);
                        running.Add(copy);
                        continue;
                    }
                    if (writing && running.Count == 0)
                    {
                        // Wake when the guest may have stopped or the next chunk is due, whichever is first.
                        var quietAt = _copy.LastGuestWriteTicks + GuestActiveMillis;
                        await SleepAsync(TimeSpan.FromMilliseconds(Math.Max(1, Math.Min(due, quietAt) - now))).ConfigureAwait(false);
                        continue;
                    }
                }
                if (running.Count == 0)
                {
                    // Guest copies still reading or writing may yet fail and put bits back: wait for
                    // them, then look again (copies that failed and were retried may have put bits back).
                    if (_copy.IsIdle(out var pending))
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
    /// Starts the copy of the dirty run at <paramref name="e"/>'s start after one block-status call over all
    /// of it (QEMU's block-copy block-status step): a run that reads as zeros is claimed and done in one
    /// piece (nothing is read; a fresh target gets no writes), data goes in chunks of at most
    /// <paramref name="maxChunk"/>. So a thin disk costs one call per extent, not one per chunk of its
    /// virtual size. With a speed limit zero runs are cut to chunks too: QEMU counts them against the
    /// limit, and the job paces itself chunk by chunk. Returns the copy and where the next run starts.
    /// </summary>
    private async ValueTask<(Task<long> Copy, long Next)> StartCopyAsync(BitmapExtent e, long length, int maxChunk)
    {
        var r = await _copy.ProbeAsync(e.Offset, Math.Min(e.End, length)).ConfigureAwait(false);
        // A chunk ends on a cluster boundary even where guest copies left the run starting inside one.
        var runEnd = r.IsZero && Speed == 0 ? r.End : Math.Min(r.End, (e.Offset + maxChunk) / _cluster * _cluster);
        var copy = r.IsZero ? _copy.CopyZeroesAsync(e.Offset, runEnd) : _copy.CopyDataAsync(e.Offset, runEnd);
        return (copy.AsTask(), runEnd);
    }

    /// <summary>
    /// Guest first: while the guest writes, the job leaves the CPUs, the page cache and the files' locks to
    /// it and copies one chunk per <see cref="GuestActiveChunkIntervalMillis"/>; copy-before-write keeps
    /// the backup exact whatever the guest does. All workers run again once the guest has been quiet for
    /// <see cref="GuestActiveMillis"/>. A backup that takes longer costs the user less than a guest that stalls.
    /// </summary>
    private bool GuestIsWriting(long now) => now - _copy.LastGuestWriteTicks < GuestActiveMillis;

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
                    // Only what no copy has claimed yet: claimed clusters are already clear.
                    _copy.Reset(start, end - start);
                }
            }
            pos += n;
        }
        SetProgressTotal(_copy.DirtyBytes);
    }

    private static long RoundUp(long v, long a) => (v + a - 1) / a * a;

    /// <summary>
    /// A guest copy failed after its guest write went on (a deferred target write, or an inline copy under
    /// break-snapshot): the target misses that old data for good, so the job fails.
    /// </summary>
    private void ThrowIfDeferredFailed()
    {
        if ((_copy.DeferredFailure ?? _filter.SnapshotError) is { } failure)
        {
            throw failure as JobFailedException ?? new JobFailedException(Describe(failure), failure);
        }
    }

    // ------------------------------------------------------------------ what the block copy asks of its owner

    int IBlockCopyOwner.ErrorEpoch => Volatile.Read(ref _errorEpoch);

    void IBlockCopyOwner.OnProgress(long bytes, bool guestCopy)
    {
        AddProgress(bytes);
        if (guestCopy)
        {
            // QSD counts copy-before-write against the speed limit: the job's own copying waits for it.
            AccountRate(bytes);
        }
    }

    /// <summary>
    /// A guest copy's target write may run after the guest write went on: its failure is the job's (and
    /// the sync bitmap keeps the bits). Only with on-cbw-error=break-snapshot, whose promise that is: with
    /// QEMU's break-guest-write a failed copy must fail the guest write, so the copy is made first. Not for
    /// sync=none, where nothing else would report it.
    /// </summary>
    bool IBlockCopyOwner.DeferGuestCopies => _s.Sync != BackupSyncMode.None && _filter.OnCbwError == OnCbwError.BreakSnapshot;

    /// <summary>
    /// One error policy decision at a time, as QEMU's single job coroutine makes: parallel copies that
    /// fail together produce one BLOCK_JOB_ERROR. A copy whose error was met before another copy's
    /// error was handled (the epoch moved) just retries; after a reported error, every copy fails.
    /// </summary>
    async ValueTask IBlockCopyOwner.OnErrorAsync(Exception error, bool isRead, int epoch)
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
        // No copy-before-write from now on; wait for the copies in flight and the deferred target writes.
        await _copy.StopGuestCopiesAsync().ConfigureAwait(false);
        if (!IsCancelled)
        {
            ThrowIfDeferredFailed();
        }
        if (_s.ReleaseTarget is not null)
        {
            await FlushOwnTargetAsync().ConfigureAwait(false);
        }
    }

    /// <summary>
    /// drive-backup's own target is closed only after the job's events (<see cref="Clean"/> cannot wait),
    /// where QSD closes it before them: flush it now, so that an image checked right after
    /// BLOCK_JOB_COMPLETED is complete and clean (a qcow2 flush gives back its allocation reserve).
    /// Errors are the close's to ignore, as QEMU's bdrv_close does.
    /// </summary>
    private async Task FlushOwnTargetAsync()
    {
        try
        {
            await _s.Target.FlushAsync().ConfigureAwait(false);
        }
#pragma warning disable CA1031 // A failed flush of a target about to be closed changes nothing the job reports.
        catch (Exception)
#pragma warning restore CA1031
        {
        }
    }

    protected override void Commit()
    {
        if (_s.Bitmap is { } b)
        {
            b.Owner.Complete(b, _s.BitmapMode, success: true, _copy.CopyBitmap);
        }
    }

    protected override void Abort()
    {
        if (_s.Bitmap is { } b)
        {
            b.Owner.Complete(b, _s.BitmapMode, success: false, _copy.CopyBitmap);
        }
    }

    protected override void Clean()
    {
        if (_cleaned)
        {
            return;
        }
        _cleaned = true;
        _s.RemoveFilter?.Invoke();
        _filter.Detach();
        _targetUser.Dispose();
        if (_s.ReleaseTarget is { } release)
        {
            // Closed before the job's last events, as in QSD: a client that sees the job end and runs
            // qemu-img on the target must find it flushed and its image locks gone. Once per job, on
            // the job's own thread, so waiting here costs no request anything.
            release().AsTask().GetAwaiter().GetResult();
        }
    }
}
