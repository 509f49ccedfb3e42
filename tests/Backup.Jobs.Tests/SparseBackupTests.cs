using System.Diagnostics;
using Backup.Block;
using Backup.Block.Bitmaps;

namespace Backup.Jobs.Tests;

/// <summary>
/// Backups of thin qcow2 images cost what the data costs: only allocated data is read, holes and zero
/// clusters cost no target writes on a fresh target, the walk asks block status once per extent, and the
/// job's progress still counts the whole disk (QSD: len = offset = virtual size for sync=full).
/// </summary>
public sealed class SparseBackupTests : IAsyncDisposable
{
    private const long MiB = 1 << 20;
    private const long GiB = 1L << 30;
    private readonly EventLog _log = new();
    private readonly JobManager _jobs;
    private readonly Qcow2Images _images = new();

    public SparseBackupTests() => _jobs = new JobManager(() => _log);

    public async ValueTask DisposeAsync() => await _images.DisposeAsync();

    private async Task RunAsync(BlockNode source, BlockNode target, BackupSyncMode sync, DirtyBitmap? bitmap = null, long speed = 0)
    {
        var job = new BackupJob(_jobs, new JobSettings("j1", Speed: speed), new BackupSettings
        {
            Source = source,
            Target = target,
            Sync = sync,
            Bitmap = bitmap,
            BitmapMode = BitmapSyncMode.OnSuccess,
        });
        _jobs.Start(job);
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("null", StringComparison.Ordinal), 60000);
        _log.Sequence("j1").Should().NotContain("BLOCK_JOB_ERROR");
    }

    private void Compare(string a, string b) =>
        Qcow2Images.Tool("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", _images.PathOf(a), _images.PathOf(b))
            .Should().Contain("Images are identical");

    [Fact]
    public async Task A_full_backup_of_a_thin_disk_reads_only_its_data_and_writes_nothing_for_holes_and_zeros()
    {
        _images.Create("src.qcow2", GiB, null,
            "write -P 0x5a 8M 1M", "write -z 64M 2M", "write -P 0x33 900M 64k", "write -P 0 300M 64k");
        _images.Create("tgt.qcow2", GiB);
        var src = new CountingNode(await _images.OpenAsync("src.qcow2"), "src");
        var tgt = new CountingNode(await _images.OpenAsync("tgt.qcow2"), "tgt");

        await RunAsync(src, tgt, BackupSyncMode.Full);

        // Allocated clusters only: 1 MiB + 64 KiB of data and 64 KiB of stored zeros (data to qcow2).
        src.BytesRead.Should().Be(MiB + 2 * 65536);
        tgt.BytesWritten.Should().Be(MiB + 65536, "the all-zero data cluster becomes a skipped zero run");
        tgt.ZeroWrites.Should().Be(0, "a fresh target without backing already reads zeros");
        src.StatusCalls.Should().BeLessThan(20, "one block-status call per extent, not per chunk");
        _log.Value("BLOCK_JOB_COMPLETED", "len").Should().Be(GiB);
        _log.Value("BLOCK_JOB_COMPLETED", "offset").Should().Be(GiB);
        await _images.CloseAsync();
        Compare("src.qcow2", "tgt.qcow2");
    }

    [Fact]
    public async Task A_full_backup_of_a_1_TiB_disk_with_little_data_walks_extents_not_the_virtual_size()
    {
        const long TiB = 1L << 40;
        _images.Create("src.qcow2", TiB, null, "write -P 0x11 0 1M", "write -P 0x22 700G 1M");
        _images.Create("tgt.qcow2", TiB);
        var src = new CountingNode(await _images.OpenAsync("src.qcow2"), "src");
        var tgt = new CountingNode(await _images.OpenAsync("tgt.qcow2"), "tgt");

        var clock = Stopwatch.StartNew();
        await RunAsync(src, tgt, BackupSyncMode.Full);
        clock.Stop();

        src.BytesRead.Should().Be(2 * MiB);
        tgt.BytesWritten.Should().Be(2 * MiB);
        src.StatusCalls.Should().BeLessThan(20);
        // 16 Mi clusters one by one took minutes; extent by extent it is a fraction of a second (loose bound: shared CI).
        clock.Elapsed.Should().BeLessThan(TimeSpan.FromSeconds(15));
        _log.Value("BLOCK_JOB_COMPLETED", "len").Should().Be(TiB);
        _log.Value("BLOCK_JOB_COMPLETED", "offset").Should().Be(TiB);
        await _images.CloseAsync();
        Compare("src.qcow2", "tgt.qcow2");
    }

    [Fact]
    public async Task Sync_top_reads_only_what_the_top_layer_allocates()
    {
        _images.Create("base.qcow2", 64 * MiB, null, "write -P 0x11 0 16M");
        _images.Create("top.qcow2", 0, "base.qcow2", "write -P 0x22 4M 1M", "write -z 8M 1M");
        _images.Create("tgt.qcow2", 0, "base.qcow2");
        var src = new CountingNode(await _images.OpenAsync("top.qcow2"), "src");
        var tgt = new CountingNode(await _images.OpenAsync("tgt.qcow2"), "tgt");

        await RunAsync(src, tgt, BackupSyncMode.Top);

        src.BytesRead.Should().Be(MiB, "the base's 16 MiB is not the top layer's");
        tgt.BytesWritten.Should().Be(MiB);
        tgt.ZeroWrites.Should().BeGreaterThan(0, "the top's zero clusters hide the base on a target with backing");
        // QSD: len is what the top layer allocates (data and zero clusters).
        _log.Value("BLOCK_JOB_COMPLETED", "len").Should().Be(2 * MiB);
        await _images.CloseAsync();
        Compare("top.qcow2", "tgt.qcow2");
    }

    [Fact]
    public async Task An_incremental_reads_only_the_data_in_its_dirty_ranges_and_zeroes_the_rest_on_a_backed_target()
    {
        _images.Create("src.qcow2", 256 * MiB, null, "write -P 0x11 0 32M");
        var node = await _images.OpenAsync("src.qcow2");
        var src = new CountingNode(node, "src");
        // The "full backup" the incremental goes on top of: the source as it is now.
        File.Copy(_images.PathOf("src.qcow2"), _images.PathOf("full.qcow2"));
        _images.Create("inc.qcow2", 0, "full.qcow2");
        var bitmap = src.GetDirtyBitmaps().Add("b0", 65536);
        await src.WriteAsync(2 * MiB, new byte[MiB].Select(_ => (byte)0x77).ToArray());
        await src.WriteZeroesAsync(10 * MiB, 4 * MiB);
        await src.WriteAsync(100 * MiB, new byte[65536].Select(_ => (byte)0x78).ToArray());
        var readBefore = src.BytesRead;
        var tgt = new CountingNode(await _images.OpenAsync("inc.qcow2"), "tgt");

        await RunAsync(src, tgt, BackupSyncMode.Bitmap, bitmap);

        (src.BytesRead - readBefore).Should().Be(MiB + 65536);
        tgt.BytesWritten.Should().Be(MiB + 65536);
        tgt.ZeroWrites.Should().BeGreaterThan(0, "the zeroed range must hide the full backup's data");
        _log.Value("BLOCK_JOB_COMPLETED", "len").Should().Be(5 * MiB + 65536);
        await _images.CloseAsync();
        Compare("src.qcow2", "inc.qcow2");
    }
}
