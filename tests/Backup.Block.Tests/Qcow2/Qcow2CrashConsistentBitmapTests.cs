using Backup.Block.Bitmaps;

namespace Backup.Block.Tests.Qcow2;

/// <summary>
/// Crash-consistent bitmaps in the qcow2 driver. A copy of the image file taken while the node is open
/// is what a kill -9 leaves behind: the bitmap in it must load consistent and cover every write made
/// before the copy, rounded out to whole regions, and nothing the bitmap did not record.
/// </summary>
public sealed class Qcow2CrashConsistentBitmapTests : IDisposable
{
    private const long MiB = 1 << 20;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public async Task An_image_copied_while_open_holds_every_written_region_and_qemu_img_accepts_it()
    {
        var path = _dir.File("disk.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", path, "64M");
        var (graph, node) = await Qcow2Open.OpenAsync(path);
        var crashed = _dir.File("crashed.qcow2");
        var written = new List<(long Offset, int Length)> { (0, 512), (5 * MiB + 4096, 8192), (33 * MiB - 512, 1024), (64 * MiB - 4096, 4096) };
        try
        {
            var bitmap = node.GetDirtyBitmaps().Add("cc", 65536, persistent: true);
            await ((ICrashConsistentBitmapStore)node).KeepCrashConsistentAsync(bitmap, default);
            bitmap.CrashTracker.Should().NotBeNull();
            var data = new byte[8192];
            await Task.WhenAll(written.Select(w => node.WriteAsync(w.Offset, data.AsMemory(0, w.Length)).AsTask()));
            bitmap.CrashTracker!.DurableRegions.Should().Be(5, "the write across 33 MiB touches two regions");
            File.Copy(path, crashed);
        }
        finally
        {
            await graph.CloseAllAsync();
        }

        // QEMU sees a bitmap left in use, as after any crash; the image itself is sound.
        QemuTools.Img("info", crashed).Should().Contain("in-use");
        QemuTools.Run("qemu-img", "check", "-f", "qcow2", crashed).ExitCode.Should().BeOneOf(0, 3);

        var (graph2, node2) = await Qcow2Open.OpenAsync(crashed);
        try
        {
            var b = node2.GetDirtyBitmaps().Get("cc");
            b.Inconsistent.Should().BeFalse();
            b.CrashTracker.Should().NotBeNull("it stays crash-consistent after the restart");
            var regions = b.Bits.DirtyExtents().ToList();
            regions.Should().Equal(
                new BitmapExtent(0, MiB), new BitmapExtent(5 * MiB, MiB), new BitmapExtent(32 * MiB, 2 * MiB), new BitmapExtent(63 * MiB, MiB));
        }
        finally
        {
            await graph2.CloseAllAsync();
        }
        // What the crash leaked (the allocation reserve) stays leaked; nothing worse.
        QemuTools.Run("qemu-img", "check", "-f", "qcow2", crashed).ExitCode.Should().BeOneOf(0, 3);
    }

    [Fact]
    public async Task A_disabled_bitmap_journals_nothing_and_a_clean_close_stores_the_exact_bits()
    {
        var path = _dir.File("disk.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", path, "16M");
        var (graph, node) = await Qcow2Open.OpenAsync(path);
        try
        {
            var set = node.GetDirtyBitmaps();
            var off = set.Add("off", 65536, persistent: true, disabled: true);
            var on = set.Add("on", 65536, persistent: true);
            await ((ICrashConsistentBitmapStore)node).KeepCrashConsistentAsync(off, default);
            await ((ICrashConsistentBitmapStore)node).KeepCrashConsistentAsync(on, default);
            await node.WriteAsync(3 * MiB, new byte[4096]);
            off.CrashTracker!.DurableRegions.Should().Be(0);
            on.CrashTracker!.DurableRegions.Should().Be(1);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.Img("check", "-f", "qcow2", path);
        var (graph2, node2) = await Qcow2Open.OpenAsync(path, readOnly: true);
        try
        {
            node2.GetDirtyBitmaps().Get("on").Bits.DirtyExtents().Should().Equal(new BitmapExtent(3 * MiB, 65536));
            node2.GetDirtyBitmaps().Get("off").Count.Should().Be(0);
        }
        finally
        {
            await graph2.CloseAllAsync();
        }
    }

    [Fact]
    public async Task A_read_write_open_by_qemu_img_withdraws_the_trust()
    {
        var path = _dir.File("disk.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", path, "16M");
        var (graph, node) = await Qcow2Open.OpenAsync(path);
        var crashed = _dir.File("crashed.qcow2");
        try
        {
            var bitmap = node.GetDirtyBitmaps().Add("cc", 65536, persistent: true);
            await ((ICrashConsistentBitmapStore)node).KeepCrashConsistentAsync(bitmap, default);
            await node.WriteAsync(MiB, new byte[4096]);
            File.Copy(path, crashed);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        // QEMU clears autoclear bits it does not know when it writes: it does not keep our promise.
        QemuTools.Io(crashed, "write -P 0x1 8M 4k");
        var (graph2, node2) = await Qcow2Open.OpenAsync(crashed);
        try
        {
            node2.GetDirtyBitmaps().Get("cc").Inconsistent.Should().BeTrue();
        }
        finally
        {
            await graph2.CloseAllAsync();
        }
    }
}
