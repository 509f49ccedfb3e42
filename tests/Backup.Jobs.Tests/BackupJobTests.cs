using Backup.Block;
using Backup.Block.Bitmaps;
using Backup.Block.Drivers.CopyBeforeWrite;

namespace Backup.Jobs.Tests;

public class BackupJobTests
{
    private const int MiB = 1 << 20;
    private readonly EventLog _log = new();
    private readonly JobManager _jobs;

    public BackupJobTests() => _jobs = new JobManager(() => _log);

    private static async Task Fill(BlockNode node, long offset, int length, byte value)
    {
        var data = new byte[length];
        Array.Fill(data, value);
        await node.WriteAsync(offset, data);
    }

    private BackupJob Start(ByteNode source, ByteNode target, BackupSyncMode sync, long speed = 0,
        DirtyBitmap? bitmap = null, BitmapSyncMode mode = BitmapSyncMode.OnSuccess, string id = "j1",
        OnCbwError onCbwError = OnCbwError.BreakGuestWrite)
    {
        var job = new BackupJob(_jobs, new JobSettings(id, Speed: speed), new BackupSettings
        {
            Source = source,
            Target = target,
            Sync = sync,
            Bitmap = bitmap,
            BitmapMode = mode,
            OnCbwError = onCbwError,
        });
        _jobs.Start(job);
        return job;
    }

    private Task Done(string id = "j1") =>
        _log.WaitForAsync(l => l.Sequence(id).EndsWith("null", StringComparison.Ordinal));

    [Fact]
    public async Task Full_backup_copies_everything()
    {
        var src = new ByteNode(4 * MiB, "src");
        await Fill(src, 0, MiB, 0x11);
        await Fill(src, 3 * MiB, 65536, 0x22);
        var tgt = new ByteNode(4 * MiB, "tgt");
        Start(src, tgt, BackupSyncMode.Full);
        await Done();
        tgt.Snapshot().Should().Equal(src.Snapshot());
        _log.Value("BLOCK_JOB_COMPLETED", "len").Should().Be(4L * MiB);
        src.WriteObservers.Should().NotContain(o => o.GetType().DeclaringType == typeof(CopyBeforeWriteNode), "copy-before-write ends with the job");
    }

    [Fact]
    public async Task Writes_during_a_slow_backup_do_not_reach_the_target()
    {
        var src = new ByteNode(8 * MiB, "src");
        await Fill(src, 0, 8 * MiB, 0x33);
        var before = src.Snapshot();
        var tgt = new ByteNode(8 * MiB, "tgt");
        var job = Start(src, tgt, BackupSyncMode.Full, speed: MiB);
        await Task.Delay(100);
        await Fill(src, 5 * MiB + 4096, 8192, 0x44);
        await Fill(src, 100, 1, 0x45);
        job.SetSpeed(0);
        await Done();
        tgt.Snapshot().Should().Equal(before);
    }

    [Fact]
    public async Task With_break_snapshot_guest_writes_go_on_once_the_old_data_is_in_memory_not_written()
    {
        var (src, tgt, before, gate) = await StartFullIntoBlockedTarget(32 * MiB);
        // Into a chunk the job is copying, and into one nobody has read yet: neither waits for the target.
        await Fill(src, 100, 10, 0x35).WaitAsync(TimeSpan.FromSeconds(10));
        await Fill(src, 20 * MiB + 4096, 8192, 0x36).WaitAsync(TimeSpan.FromSeconds(10));
        _log.Sequence("j1").Should().Be("created running");
        await UnblockAndExpectTheStartInstant(tgt, before, gate);
    }

    [Fact]
    public async Task With_break_guest_write_a_guest_write_waits_until_its_old_data_is_on_the_target()
    {
        var (src, tgt, before, gate) = await StartFullIntoBlockedTarget(32 * MiB, OnCbwError.BreakGuestWrite);
        var write = Fill(src, 20 * MiB + 4096, 8192, 0x36);
        await Task.Delay(300);
        write.IsCompleted.Should().BeFalse("QEMU's default: the copy reaches the target before the guest write goes on");
        await UnblockAndExpectTheStartInstant(tgt, before, gate);
        await write;
    }

    [Fact]
    public async Task With_break_guest_write_a_failed_copy_fails_the_guest_write()
    {
        var src = new ByteNode(32 * MiB, "src");
        await Fill(src, 0, 32 * MiB, 0x37);
        var gate = new TaskCompletionSource();
        var tgt = new ByteNode(32 * MiB, "tgt") { WriteGate = gate.Task, FailWritesAt = 20 * MiB + 65536 };
        Start(src, tgt, BackupSyncMode.Full);
        await WaitUntil(() => tgt.WritesStarted > 0);
        var write = Fill(src, 20 * MiB + 65536, 4096, 0x38);
        await Task.Delay(100);
        gate.SetResult();
        await FluentActions.Awaiting(() => write).Should().ThrowAsync<IOException>("QEMU's default: the guest write fails with its copy");
        src.Snapshot()[20 * MiB + 65536].Should().Be(0x37, "the failed guest write changed nothing");
        await Done();
        // The job's own copy of that chunk fails too (the target fails there for good): its error, not the guest's.
        _log.Value("BLOCK_JOB_COMPLETED", "error").Should().Be("Input/output error");
    }

    /// <summary>A full backup of a filled source into a target whose writes wait, once the job has read its first chunks.</summary>
    private async Task<(ByteNode Src, ByteNode Tgt, byte[] Before, TaskCompletionSource Gate)> StartFullIntoBlockedTarget(int size,
        OnCbwError onCbwError = OnCbwError.BreakSnapshot)
    {
        var src = new ByteNode(size, "src");
        await Fill(src, 0, size, 0x34);
        var gate = new TaskCompletionSource();
        var tgt = new ByteNode(size, "tgt") { WriteGate = gate.Task };
        Start(src, tgt, BackupSyncMode.Full, onCbwError: onCbwError);
        await WaitUntil(() => tgt.WritesStarted > 0);
        return (src, tgt, src.Snapshot(), gate);
    }

    private async Task UnblockAndExpectTheStartInstant(ByteNode tgt, byte[] before, TaskCompletionSource gate)
    {
        gate.SetResult();
        await Done();
        _log.Sequence("j1").Should().EndWith("BLOCK_JOB_COMPLETED concluded null");
        tgt.Snapshot().Should().Equal(before);
        _log.Value("BLOCK_JOB_COMPLETED", "len").Should().Be(before.LongLength);
    }

    [Fact]
    public async Task A_guest_zero_write_over_many_chunks_is_copied_before_in_bounded_pieces()
    {
        var (src, tgt, before, gate) = await StartFullIntoBlockedTarget(48 * MiB);
        // 40 MiB of old data fits in the memory held for deferred copies: the guest does not wait.
        await src.WriteZeroesAsync(4 * MiB, 40 * MiB).AsTask().WaitAsync(TimeSpan.FromSeconds(10));
        await UnblockAndExpectTheStartInstant(tgt, before, gate);
    }

    [Fact]
    public async Task A_deferred_target_write_that_fails_fails_the_job_and_keeps_the_bits()
    {
        var src = new ByteNode(32 * MiB, "src");
        var b0 = src.GetDirtyBitmaps().Add("b0");
        await Fill(src, 0, 32 * MiB, 0x37);
        var gate = new TaskCompletionSource();
        var tgt = new ByteNode(32 * MiB, "tgt") { WriteGate = gate.Task, FailWritesAt = 20 * MiB + 65536 };
        Start(src, tgt, BackupSyncMode.Bitmap, bitmap: b0, mode: BitmapSyncMode.Always, onCbwError: OnCbwError.BreakSnapshot);
        await WaitUntil(() => tgt.WritesStarted > 0);
        // The guest write succeeds; the copy of its chunk's old data fails later, at the target.
        await Fill(src, 20 * MiB + 65536, 4096, 0x38).WaitAsync(TimeSpan.FromSeconds(10));
        gate.SetResult();
        await Done();
        _log.Sequence("j1").Should().Be("created running BLOCK_JOB_ERROR aborting BLOCK_JOB_COMPLETED concluded null");
        _log.Value("BLOCK_JOB_COMPLETED", "error").Should().Be("Input/output error");
        b0.Busy.Should().BeFalse();
        b0.Bits.Get(20 * MiB + 65536).Should().BeTrue();
    }

    [Fact]
    public async Task Bitmap_mode_always_keeps_a_chunk_whose_target_write_failed()
    {
        var src = new ByteNode(4 * MiB, "src");
        var b0 = src.GetDirtyBitmaps().Add("b0");
        await Fill(src, 0, 4 * MiB, 0x39);
        var tgt = new ByteNode(4 * MiB, "tgt") { FailWritesAt = 2 * MiB };
        Start(src, tgt, BackupSyncMode.Bitmap, bitmap: b0, mode: BitmapSyncMode.Always);
        await Done();
        _log.Value("BLOCK_JOB_COMPLETED", "error").Should().Be("Input/output error");
        // What was copied is clear; the failed chunk is not.
        b0.Bits.Get(2 * MiB).Should().BeTrue();
        b0.Count.Should().BeLessThan(4L * MiB);
    }

    private static async Task WaitUntil(Func<bool> condition)
    {
        for (var i = 0; !condition(); i++)
        {
            i.Should().BeLessThan(1000, "the condition should hold within 10 s");
            await Task.Delay(10);
        }
    }

    [Fact]
    public async Task Incremental_copies_the_bitmap_and_clears_it()
    {
        var src = new ByteNode(4 * MiB, "src");
        var set = src.GetDirtyBitmaps();
        var b0 = set.Add("b0");
        await Fill(src, MiB, 4096, 0x55);
        var tgt = new ByteNode(4 * MiB, "tgt");
        Start(src, tgt, BackupSyncMode.Bitmap, bitmap: b0);
        await Done();
        _log.Value("BLOCK_JOB_COMPLETED", "len").Should().Be(65536L);
        tgt.Snapshot().AsSpan(MiB, 65536).ToArray().Should().Equal(src.Snapshot().AsSpan(MiB, 65536).ToArray());
        tgt.Snapshot().AsSpan(0, MiB).ToArray().Should().OnlyContain(b => b == 0);
        b0.Count.Should().Be(0);
        b0.Busy.Should().BeFalse();
        set.Bitmaps.Should().ContainSingle();
    }

    [Fact]
    public async Task Cancel_keeps_old_bits_and_writes_made_during_the_job()
    {
        var src = new ByteNode(8 * MiB, "src");
        var b0 = src.GetDirtyBitmaps().Add("b0");
        await Fill(src, 0, 4 * MiB, 0x66);
        var tgt = new ByteNode(8 * MiB, "tgt");
        var job = Start(src, tgt, BackupSyncMode.Bitmap, speed: MiB, bitmap: b0);
        b0.Busy.Should().BeTrue();
        await Fill(src, 6 * MiB, 4096, 0x67);
        job.Cancel(force: true);
        await Done();
        _log.Sequence("j1").Should().Be("created running aborting BLOCK_JOB_CANCELLED concluded null");
        b0.Count.Should().Be(4L * MiB + 65536);
        b0.Busy.Should().BeFalse();
    }

    [Fact]
    public async Task Target_write_error_reports_and_restores_the_bitmap()
    {
        var src = new ByteNode(4 * MiB, "src");
        var b0 = src.GetDirtyBitmaps().Add("b0");
        await Fill(src, 0, MiB, 0x77);
        var tgt = new ByteNode(4 * MiB, "tgt") { FailWrites = 28 };
        Start(src, tgt, BackupSyncMode.Bitmap, bitmap: b0);
        await Done();
        _log.Sequence("j1").Should().Be("created running BLOCK_JOB_ERROR aborting BLOCK_JOB_COMPLETED concluded null");
        _log.Value("BLOCK_JOB_COMPLETED", "error").Should().Be("No space left on device");
        _log.Value("BLOCK_JOB_ERROR", "action").Should().Be("report");
        b0.Count.Should().Be(MiB);
    }

    [Fact]
    public async Task Differential_never_clears_the_bitmap()
    {
        var src = new ByteNode(4 * MiB, "src");
        var b0 = src.GetDirtyBitmaps().Add("b0");
        await Fill(src, 0, MiB, 0x78);
        var tgt = new ByteNode(4 * MiB, "tgt");
        Start(src, tgt, BackupSyncMode.Bitmap, bitmap: b0, mode: BitmapSyncMode.Never);
        await Done();
        b0.Count.Should().Be(MiB);
        tgt.Snapshot().AsSpan(0, MiB).ToArray().Should().OnlyContain(b => b == 0x78);
    }

    [Fact]
    public async Task Target_is_pinned_while_the_job_runs()
    {
        var src = new ByteNode(4 * MiB, "src");
        var tgt = new ByteNode(4 * MiB, "tgt");
        var job = Start(src, tgt, BackupSyncMode.None);
        tgt.BusyReason.Should().Be("block device is in use by block job: backup");
        job.Cancel(force: true);
        await Done();
        tgt.BusyReason.Should().BeNull();
    }

    [Fact]
    public async Task On_target_error_stop_pauses_and_resume_retries()
    {
        var src = new ByteNode(2 * MiB, "src");
        await Fill(src, 0, 2 * MiB, 0x79);
        var tgt = new ByteNode(2 * MiB, "tgt") { FailWrites = 28 };
        var job = new BackupJob(_jobs, new JobSettings("j1"), new BackupSettings
        {
            Source = src, Target = tgt, Sync = BackupSyncMode.Full, OnTargetError = "enospc",
        });
        _jobs.Start(job);
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("paused", StringComparison.Ordinal));
        _log.Value("BLOCK_JOB_ERROR", "action").Should().Be("stop");
        job.IoStatus.Should().Be("nospace");
        job.UserPaused.Should().BeTrue();
        tgt.FailWrites = 0;
        job.Resume();
        await Done();
        _log.Sequence("j1").Should().Be("created running BLOCK_JOB_ERROR paused running waiting pending BLOCK_JOB_COMPLETED concluded null");
        tgt.Snapshot().Should().Equal(src.Snapshot());
    }

    [Fact]
    public async Task Sync_none_copies_only_what_the_guest_overwrites()
    {
        var src = new ByteNode(4 * MiB, "src");
        await Fill(src, 0, 4 * MiB, 0x5a);
        var tgt = new ByteNode(4 * MiB, "tgt");
        var job = Start(src, tgt, BackupSyncMode.None);
        await Fill(src, MiB + 100, 10, 0x01);
        await Fill(src, MiB + 200, 10, 0x02);
        var t = tgt.Snapshot();
        t.AsSpan(MiB, 65536).ToArray().Should().OnlyContain(b => b == 0x5a);
        t.AsSpan(0, MiB).ToArray().Should().OnlyContain(b => b == 0);
        t.AsSpan(MiB + 65536).ToArray().Should().OnlyContain(b => b == 0);
        job.ProgressCurrent.Should().Be(65536);
        job.Cancel(force: true);
        await Done();
    }

    [Fact]
    public async Task Parallel_copies_failing_together_report_one_error()
    {
        var src = new ByteNode(16 * MiB, "src");
        await Fill(src, 0, 16 * MiB, 0x7a);
        var tgt = new ByteNode(16 * MiB, "tgt") { FailWrites = 5 };
        Start(src, tgt, BackupSyncMode.Full);
        await Done();
        _log.Sequence("j1").Should().Be("created running BLOCK_JOB_ERROR aborting BLOCK_JOB_COMPLETED concluded null");
        _log.Value("BLOCK_JOB_COMPLETED", "error").Should().Be("Input/output error");
        _jobs.Jobs.Should().BeEmpty();
    }

    [Fact]
    public async Task Prepared_job_aborts_without_block_job_events_or_starts_later()
    {
        var src = new ByteNode(2 * MiB, "src");
        var b0 = src.GetDirtyBitmaps().Add("b0");
        await Fill(src, 0, MiB, 0x7b);
        var job = new BackupJob(_jobs, new JobSettings("t1"), new BackupSettings
        {
            Source = src, Target = new ByteNode(2 * MiB, "tgt"), Sync = BackupSyncMode.Bitmap, Bitmap = b0,
        });
        _jobs.Register(job);
        b0.Busy.Should().BeTrue();
        job.AbortUnstarted();
        _log.Sequence("t1").Should().Be("created aborting concluded null");
        b0.Busy.Should().BeFalse();
        b0.Count.Should().Be(MiB);
        src.WriteObservers.Should().NotContain(o => o.GetType().DeclaringType == typeof(CopyBeforeWriteNode), "copy-before-write ends with the job");

        var tgt = new ByteNode(2 * MiB, "tgt2");
        var job2 = new BackupJob(_jobs, new JobSettings("t2"), new BackupSettings
        {
            Source = src, Target = tgt, Sync = BackupSyncMode.Bitmap, Bitmap = b0,
        });
        _jobs.Register(job2);
        await Fill(src, 0, 4096, 0x7c);
        _jobs.Run(job2);
        await Done("t2");
        _log.Sequence("t2").Should().Be("created running waiting pending BLOCK_JOB_COMPLETED concluded null");
        tgt.Snapshot().AsSpan(0, 4096).ToArray().Should().OnlyContain(b => b == 0x7b, "the point in time is the prepare");
        b0.Count.Should().Be(65536, "the write after prepare is in the bitmap");
    }

    [Fact]
    public async Task Copies_that_guest_writes_trigger_count_against_the_speed_limit()
    {
        // As QSD (block-copy accounts copy-before-write in the job's rate limit): 16 MiB at 4 MiB/s takes
        // about 4 s even when guest writes made three quarters of the copies. Counting only its own
        // copies the job took about 1 s.
        var src = new ByteNode(16 * MiB, "src");
        await Fill(src, 0, 16 * MiB, 0x21);
        var tgt = new ByteNode(16 * MiB, "tgt");
        var job = new BackupJob(_jobs, new JobSettings("s1", Speed: 4 * MiB), new BackupSettings
        {
            Source = src, Target = tgt, Sync = BackupSyncMode.Full,
        });
        _jobs.Register(job);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        await Fill(src, 4 * MiB, 12 * MiB, 0x42);
        _jobs.Run(job);
        await Done("s1");
        clock.Stop();
        clock.Elapsed.Should().BeGreaterThan(TimeSpan.FromSeconds(3.5));
        tgt.Snapshot().Should().OnlyContain(b => b == 0x21, "the guest's writes came after the point in time");
        _log.Value("BLOCK_JOB_COMPLETED", "offset").Should().Be(16L * MiB);
    }

    [Fact]
    public async Task While_the_guest_writes_the_job_steps_back_yet_finishes()
    {
        // Guest first: a guest that writes without pause gets the machine; the job copies about one 1 MiB
        // chunk per 50 ms meanwhile (in memory it would otherwise take all 64 MiB in a blink), and still ends.
        var src = new ByteNode(64 * MiB, "src");
        await Fill(src, 0, 64 * MiB, 0x21);
        // A millisecond per target write, as a disk: all 64 chunks would take some 10 ms with 8 workers.
        var tgt = new ByteNode(64 * MiB, "tgt") { WriteDelay = TimeSpan.FromMilliseconds(1) };
        using var stop = new CancellationTokenSource();
        var guestBuffer = new byte[4096];
        Array.Fill(guestBuffer, (byte)0x42);
        var guest = Task.Run(async () =>
        {
            // The same 0x42 into the first 64 KiB over and over: once round, it reads the same from then on.
            for (var i = 0; !stop.IsCancellationRequested; i = (i + 1) % 16)
            {
                await src.WriteAsync(i * 4096L, guestBuffer);
                await Task.Yield();
            }
        });
        await Task.Delay(200);
        var job = Start(src, tgt, BackupSyncMode.Full);
        await Task.Delay(500);
        var early = job.ProgressCurrent;
        await Done().WaitAsync(TimeSpan.FromSeconds(30));
        await stop.CancelAsync();
        await guest;

        // Stepping back the whole time it would copy about ten chunks; scheduling on a busy machine gives the
        // guest gaps of 20 ms now and then, when all workers run. Without stepping back: done in some 10 ms.
        early.Should().BeLessThan(56L * MiB, "while the guest writes the job copies one chunk at a time, every 50 ms");
        _log.Value("BLOCK_JOB_COMPLETED", "offset").Should().Be(64L * MiB);
        var copy = tgt.Snapshot();
        copy.AsSpan(0, 64 * 1024).ToArray().Should().OnlyContain(b => b == 0x42);
        copy.AsSpan(64 * 1024).ToArray().Should().OnlyContain(b => b == 0x21);
    }
}
