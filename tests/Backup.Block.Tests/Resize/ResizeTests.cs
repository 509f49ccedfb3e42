using Backup.Block.Bitmaps;
using Backup.Block.Tests.Qcow2;

namespace Backup.Block.Tests.Resize;

/// <summary>
/// block_resize's one path (BlockNode.TruncateAsync and NodeResize) for file, raw and qcow2 nodes:
/// sizes, data, bitmaps (counts as QSD 7.2 reports them for the same steps), and qemu-img's view.
/// </summary>
public sealed class ResizeTests : IAsyncLifetime, IDisposable
{
    private const long MiB = 1L << 20;
    private readonly TempDir _dir = new();
    private BlockGraph _graph = BlockGraph.CreateDefault();

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync()
    {
        await _graph.CloseAllAsync();
        _dir.Dispose();
    }

    public void Dispose() => _dir.Dispose();

    private async Task<BlockNode> OpenRawAsync(string path, long size, string name = "a", params (string Key, object Value)[] rawOptions)
    {
        await using (var f = File.Create(path))
        {
            f.SetLength(size);
        }
        await _graph.AddAsync(new BlockOptions { ["driver"] = "file", ["node-name"] = name + "f", ["filename"] = path });
        var o = new BlockOptions { ["driver"] = "raw", ["node-name"] = name, ["file"] = name + "f" };
        foreach (var (k, v) in rawOptions)
        {
            o[k] = v;
        }
        return await _graph.AddAsync(o);
    }

    private async Task<BlockNode> OpenQcow2Async(string path)
    {
        var node = await _graph.AddAsync(new BlockOptions
        {
            ["driver"] = "qcow2",
            ["node-name"] = "q",
            ["file"] = new BlockOptions { ["driver"] = "file", ["node-name"] = "qf", ["filename"] = path },
        });
        return node;
    }

    private async Task ReopenGraphAsync()
    {
        await _graph.CloseAllAsync();
        _graph = BlockGraph.CreateDefault();
    }

    private static byte[] Pattern(byte value, int length)
    {
        var b = new byte[length];
        Array.Fill(b, value);
        return b;
    }

    [Fact]
    public async Task Raw_grow_and_shrink_resize_the_file_and_every_bitmap_as_QSD_does()
    {
        var path = _dir.File("a.raw");
        var a = await OpenRawAsync(path, 4 * MiB);
        var af = _graph.Get("af");
        var set = a.GetDirtyBitmaps();
        set.Add("b64");
        set.Add("b4k", 4096);
        set.Add("b512", 512);
        af.GetDirtyBitmaps().Add("fb");
        await a.WriteAsync(0, Pattern(0x55, 65536));
        await a.WriteAsync(4 * MiB - 65536, Pattern(0x55, 65536));
        await a.WriteAsync(1000, Pattern(0x55, 10));

        await NodeResize.ResizeAsync(_graph, null, "a", 4 * MiB - 65536 - 1000);
        new FileInfo(path).Length.Should().Be(4 * MiB - 65536 - 1000);
        // QSD: 65536 in every bitmap after the shrink (the last write's bits are gone).
        set.Bitmaps.Select(b => b.Count).Should().AllBeEquivalentTo(65536L);
        af.GetDirtyBitmaps().Get("fb").Count.Should().Be(65536);

        await NodeResize.ResizeAsync(_graph, null, "a", 8 * MiB);
        a.Length.Should().Be(8 * MiB);
        af.Length.Should().Be(8 * MiB);
        set.Get("b64").Count.Should().Be(65536, "growth adds clean bits");
        await a.WriteAsync(8388000, Pattern(0x66, 608));
        // QSD after the same write: 4K 69632, 512 66560, 64K 131072.
        (set.Get("b4k").Count, set.Get("b512").Count, set.Get("b64").Count).Should().Be((69632L, 66560L, 131072L));
        var back = new byte[65536];
        await a.ReadAsync(0, back);
        back.Should().AllBeEquivalentTo((byte)0x55);
        await a.ReadAsync(4 * MiB, back);
        back.Should().AllBeEquivalentTo((byte)0, "the grown area reads as zeros");
    }

    [Fact]
    public async Task Raw_windows_and_read_only_nodes_refuse_with_QEMUs_texts()
    {
        var w = await OpenRawAsync(_dir.File("w.raw"), 4 * MiB, "w", ("offset", 512L), ("size", MiB));
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "w", 2 * MiB))
            .Should().ThrowAsync<BlockException>().WithMessage("Cannot resize fixed-size raw disks");
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "wf", 2 * MiB))
            .Should().ThrowAsync<BlockException>().WithMessage(
                "Permission conflict on node 'wf': permissions 'resize' are both required by an unnamed block device " +
                "(uses node 'wf' as 'root' child) and unshared by node 'w' (uses node 'wf' as 'file' child).");
        w.Length.Should().Be(MiB);

        File.WriteAllBytes(_dir.File("ro.raw"), new byte[4096]);
        await _graph.AddAsync(new BlockOptions { ["driver"] = "file", ["node-name"] = "ro", ["filename"] = _dir.File("ro.raw"), ["read-only"] = true });
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "ro", 8192))
            .Should().ThrowAsync<BlockException>().WithMessage("Image is read-only");
    }

    [Fact]
    public async Task Lookups_and_arguments_fail_as_in_QSD()
    {
        await OpenRawAsync(_dir.File("a.raw"), MiB);
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, null, MiB))
            .Should().ThrowAsync<BlockException>().WithMessage("Cannot find device='' nor node-name=''");
        // QSD has no devices: a node name given as device is not found.
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, "a", null, MiB))
            .Should().ThrowAsync<BlockException>().WithMessage("Cannot find device='a' nor node-name=''");
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "a", -1))
            .Should().ThrowAsync<BlockException>().WithMessage("Parameter 'size' expects a >0 size");
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "a", long.MaxValue))
            .Should().ThrowAsync<BlockException>().WithMessage("offset(9223372036854775807) exceeds maximum(9223372035781033984)");
        await NodeResize.ResizeAsync(_graph, "a", "a", 2 * MiB);
        _graph.Get("a").Length.Should().Be(2 * MiB);
    }

    [Fact]
    public async Task Nodes_in_use_by_an_export_or_a_job_cannot_be_resized()
    {
        var a = await OpenRawAsync(_dir.File("a.raw"), MiB);
        using (a.AddUser("block device is in use by export 'e0'"))
        {
            await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "a", 2 * MiB))
                .Should().ThrowAsync<BlockException>().WithMessage(
                    "Permission conflict on node 'a': permissions 'resize' are both required by an unnamed block device " +
                    "(uses node 'a' as 'root' child) and unshared by an unnamed block device (uses node 'a' as 'root' child).");
            // The raw node passes its export's restriction down to its file.
            await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "af", 2 * MiB))
                .Should().ThrowAsync<BlockException>().WithMessage("*unshared by node 'a' (uses node 'af' as 'file' child).");
        }
        using (a.AddJobTarget("block device is in use by block job: backup"))
        {
            await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, "x", "a", 2 * MiB))
                .Should().ThrowAsync<BlockException>().WithMessage("Device 'x' is in use");
            await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "a", 2 * MiB))
                .Should().ThrowAsync<BlockException>().WithMessage("Device '(null)' is in use");
        }
        await NodeResize.ResizeAsync(_graph, null, "af", 2 * MiB);
        a.Length.Should().Be(2 * MiB);
    }

    [Fact]
    public async Task Qcow2_grows_its_L1_table_and_stays_check_clean_with_data_kept()
    {
        var img = _dir.File("g.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", img, "64M");
        QemuTools.Io(img, "write -P 0x11 0 1M", "write -P 0x22 63M 1M");
        var q = await OpenQcow2Async(img);
        q.GetDirtyBitmaps().Add("pb", persistent: true);
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "q", 64 * MiB + 1000))
            .Should().ThrowAsync<BlockException>().WithMessage("The new size must be a multiple of 512");
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "qf", 128 * MiB))
            .Should().ThrowAsync<BlockException>().WithMessage("*unshared by node 'q' (uses node 'qf' as 'file' child).");
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "q", 1L << 62))
            .Should().ThrowAsync<BlockException>().WithMessage("Failed to grow the L1 table: File too large");

        // 64 MiB → 3 GiB: the L1 table (512 MiB per entry) goes from 1 to 6 entries, in new clusters.
        await NodeResize.ResizeAsync(_graph, null, "q", 3L << 30);
        q.Length.Should().Be(3L << 30);
        await q.WriteAsync((3L << 30) - MiB, Pattern(0x33, (int)MiB));
        q.GetDirtyBitmaps().Get("pb").Count.Should().Be(MiB);
        await ReopenGraphAsync();

        QemuTools.CheckClean(img);
        var info = QemuTools.Info(img);
        info.GetProperty("virtual-size").GetInt64().Should().Be(3L << 30);
        var bitmaps = info.GetProperty("format-specific").GetProperty("data").GetProperty("bitmaps");
        bitmaps[0].GetProperty("name").GetString().Should().Be("pb");
        QemuTools.Io(img, "read -P 0x11 0 1M", "read -P 0x22 63M 1M", "read -P 0 64M 2M", $"read -P 0x33 {(3L << 30) - MiB} 1M");
        QemuTools.Img("bitmap", "--disable", img, "pb"); // qemu-img accepts the stored bitmap at the new size

        var again = await OpenQcow2Async(img);
        again.Length.Should().Be(3L << 30);
        again.GetDirtyBitmaps().Get("pb").Should().Match<DirtyBitmap>(b => b.Count == MiB && b.Size == 3L << 30);
    }

    [Fact]
    public async Task Qcow2_shrink_drops_data_past_the_end_and_grows_back_as_zeros()
    {
        var img = _dir.File("s.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", img, "1G");
        QemuTools.Io(img, "write -P 0x11 0 64k", "write -P 0x22 3M 1M", "write -P 0x44 600M 1M");
        var q = await OpenQcow2Async(img);
        var set = q.GetDirtyBitmaps();
        set.Add("pb", persistent: true);
        set.Add("tb", 4096);
        await q.WriteAsync(0, Pattern(0x55, 65536));
        await q.WriteAsync(3 * MiB, Pattern(0x66, (int)MiB));
        await q.WriteAsync(4190208, Pattern(0x77, 4096));

        // As QSD: 3.5 MiB + 512 keeps 10 chunks of 64 KiB and 145 of 4 KiB.
        await NodeResize.ResizeAsync(_graph, null, "q", 3 * MiB + 512 * 1024 + 512);
        (set.Get("pb").Count, set.Get("tb").Count).Should().Be((655360L, 593920L));
        await NodeResize.ResizeAsync(_graph, null, "q", 8L << 30);
        (set.Get("pb").Count, set.Get("tb").Count).Should().Be((655360L, 593920L));
        await ReopenGraphAsync();

        QemuTools.CheckClean(img);
        QemuTools.Info(img).GetProperty("virtual-size").GetInt64().Should().Be(8L << 30);
        QemuTools.Io(img, "read -P 0x55 0 64k", "read -P 0x66 3M 512k", "read -P 0x66 3584k 512",
            "read -P 0 3670528 65024", "read -P 0 3735552 1M", "read -P 0 600M 1M");
    }

    [Fact]
    public async Task Qcow2_refuses_with_inconsistent_bitmaps()
    {
        var img = _dir.File("i.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", img, "4M");
        QemuTools.Img("bitmap", "--add", img, "ib");
        // A copy taken while the image is open read-write has the bitmap flagged in use: an unclean shutdown.
        await OpenQcow2Async(img);
        File.Copy(img, _dir.File("crashed.qcow2"));
        await ReopenGraphAsync();
        var q = await OpenQcow2Async(_dir.File("crashed.qcow2"));
        q.GetDirtyBitmaps().Get("ib").Inconsistent.Should().BeTrue();
        await FluentActions.Awaiting(async () => await NodeResize.ResizeAsync(_graph, null, "q", 8 * MiB))
            .Should().ThrowAsync<BlockException>().WithMessage("Bitmap 'ib' is inconsistent and cannot be used");
        q.Length.Should().Be(4 * MiB);
    }
}
