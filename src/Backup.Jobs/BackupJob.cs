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
/// to the target as write-zeroes. One async lock serialises copies, so a chunk is copied exactly once.
/// </summary>
// CA1001: the SemaphoreSlim's wait handle is never created, so there is nothing to dispose.
#pragma warning disable CA1001
public sealed class BackupJob : Job, IWriteObserver
#pragma warning restore CA1001
{
    public const string BusyReason = "block device is in use by block job: backup";
    private const int DefaultChunk = 1 << 20;

    private readonly BackupSettings _s;
    private readonly DirtyBitmap _copyBitmap;
    private readonly HBitmap _copy;
    private readonly long _cluster;
    private readonly int _maxChunk;
    private readonly SemaphoreSlim _copyLock = new(1, 1);
    private readonly IDisposable _targetUser;
    private volatile bool _cbwOff;
    private bool _cleaned;

    public BackupJob(JobManager manager, JobSettings settings, BackupSettings backup) : base(manager, settings)
    {
        ArgumentNullException.ThrowIfNull(backup);
        _s = backup;
        _cluster = ClusterSize(backup.Target);
        _maxChunk = (int)Math.Max(_cluster, backup.MaxChunk > 0 ? Math.Min(backup.MaxChunk, 64 << 20) : DefaultChunk);
        _maxChunk -= (int)(_maxChunk % _cluster);
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
        SetProgressTotal(backup.Sync == BackupSyncMode.None ? 0 : _copy.DirtyByteCount);
        _targetUser = backup.Target.AddUser(BusyReason);
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
        while (offset < length)
        {
            var extent = _copy.NextDirtyExtent(offset, length - offset);
            if (extent is not { } e)
            {
                break;
            }
            var end = Math.Min(e.End, Math.Min(length, e.Offset + _maxChunk));
            var copied = await CopyAsync(e.Offset, end, fromJob: true).ConfigureAwait(false);
            offset = end;
            await RateLimitAsync(copied).ConfigureAwait(false);
        }
    }

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
                    await _copyLock.WaitAsync().ConfigureAwait(false);
                    try
                    {
                        _copy.Reset(start, end - start);
                    }
                    finally
                    {
                        _copyLock.Release();
                    }
                }
            }
            pos += n;
        }
        SetProgressTotal(_copy.DirtyByteCount);
    }

    private static long RoundUp(long v, long a) => (v + a - 1) / a * a;

    /// <summary>Copies the still-dirty clusters of [start, end) (cluster-aligned start); returns the bytes copied.</summary>
    private async ValueTask<long> CopyAsync(long start, long end, bool fromJob)
    {
        await _copyLock.WaitAsync().ConfigureAwait(false);
        try
        {
            if (!fromJob && _cbwOff)
            {
                return 0;
            }
            var total = 0L;
            var pos = start;
            while (pos < end)
            {
                if (_copy.NextDirtyExtent(pos, end - pos) is not { } e)
                {
                    break;
                }
                await CopyExtentAsync(e.Offset, e.End, fromJob).ConfigureAwait(false);
                _copy.Reset(e.Offset, e.Length);
                var bytes = Math.Min(e.End, _s.Source.Length) - e.Offset;
                AddProgress(bytes);
                total += bytes;
                pos = e.End;
            }
            return total;
        }
        finally
        {
            _copyLock.Release();
        }
    }

    private async ValueTask CopyExtentAsync(long start, long end, bool fromJob)
    {
        var length = _s.Source.Length;
        end = Math.Min(end, length);
        var buffer = new byte[Math.Min(_maxChunk, end - start)];
        var pos = start;
        while (pos < end)
        {
            var max = Math.Min(end - pos, _maxChunk);
            BlockStatus st;
            int n;
            bool zero;
            while (true)
            {
                try
                {
                    st = await _s.Source.GetBlockStatusAsync(pos, max).ConfigureAwait(false);
                    if (st.IsZero && (st.Length >= _cluster || pos + st.Length >= length))
                    {
                        n = (int)(pos + st.Length >= end ? end - pos : st.Length / _cluster * _cluster);
                        zero = true;
                    }
                    else
                    {
                        var want = st.IsZero || st.Length <= 0 ? _cluster : RoundUp(st.Length, _cluster);
                        n = (int)Math.Min(max, want);
                        await _s.Source.ReadAsync(pos, buffer.AsMemory(0, n)).ConfigureAwait(false);
                        zero = buffer.AsSpan(0, n).IndexOfAnyExcept((byte)0) < 0;
                    }
                    break;
                }
                catch (Exception ex) when (fromJob && ex is not OperationCanceledException)
                {
                    await HandleErrorAsync(ex, isRead: true, _s.OnSourceError).ConfigureAwait(false);
                }
            }
            while (true)
            {
                try
                {
                    if (zero)
                    {
                        await _s.Target.WriteZeroesAsync(pos, n).ConfigureAwait(false);
                    }
                    else
                    {
                        await _s.Target.WriteAsync(pos, buffer.AsMemory(0, n)).ConfigureAwait(false);
                    }
                    break;
                }
                catch (Exception ex) when (fromJob && ex is not OperationCanceledException)
                {
                    await HandleErrorAsync(ex, isRead: false, _s.OnTargetError).ConfigureAwait(false);
                }
            }
            pos += n;
        }
    }

    protected override async ValueTask AfterRunAsync()
    {
        // No copy-before-write from now on; wait for one in flight.
        _cbwOff = true;
        await _copyLock.WaitAsync().ConfigureAwait(false);
        _copyLock.Release();
        _s.Source.RemoveWriteObserver(this);
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
        var end = Math.Min(RoundUp(offset + length, _cluster), _copy.Size);
        if (offset >= end || _copy.NextDirty(offset, end - offset) < 0)
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
