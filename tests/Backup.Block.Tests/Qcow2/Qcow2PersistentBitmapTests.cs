using System.Buffers.Binary;
using System.Text.Json;
using Backup.Block.Bitmaps;
using Backup.Block.Drivers.Qcow2;

namespace Backup.Block.Tests.Qcow2;

/// <summary>
/// Persistent bitmaps through the qcow2 node: stored at close in QEMU's format (qemu-img reads them,
/// qemu-img check stays clean), loaded at open, flagged in use while open read-write.
/// </summary>
public sealed class Qcow2PersistentBitmapTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private string Create(string size = "64M", int cluster = 65536)
    {
        var img = _dir.File("d.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={cluster}", img, size);
        return img;
    }

    private static List<(string Name, long Granularity, string[] Flags)> ImageBitmaps(string img)
    {
        var data = QemuTools.Info(img).GetProperty("format-specific").GetProperty("data");
        if (!data.TryGetProperty("bitmaps", out var list))
        {
            return [];
        }
        return [.. list.EnumerateArray().Select(b => (b.GetProperty("name").GetString()!, b.GetProperty("granularity").GetInt64(),
            b.GetProperty("flags").EnumerateArray().Select(f => f.GetString()!).ToArray()))];
    }

    [Fact]
    public async Task Bitmaps_survive_close_and_open_with_their_bits_flags_and_order()
    {
        var img = Create();
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        var set = node.GetDirtyBitmaps();
        set.Add("pa", persistent: true);
        set.Add("p4k", 4096, persistent: true);
        set.Add("pd", persistent: true, disabled: true);
        set.Add("tr");
        await node.WriteAsync(0, new byte[100 * 1024]);
        await node.WriteAsync((7 << 20) + 1, new byte[1]);
        await node.WriteAsync((64 << 20) - 512, new byte[512]);
        var sha = set.Bitmaps.Where(b => b.Name is not null).ToDictionary(b => b.Name!, b => b.Sha256());
        await graph.CloseAllAsync();

        QemuTools.CheckClean(img);
        // QEMU's order: new bitmaps newest first; "auto" for enabled ones; in_use cleared at close.
        ImageBitmaps(img).Select(b => (b.Name, b.Granularity, string.Join(",", b.Flags))).Should().Equal(
            ("pd", 65536L, ""), ("p4k", 4096L, "auto"), ("pa", 65536L, "auto"));

        (graph, node) = await Qcow2Open.OpenAsync(img);
        set = node.GetDirtyBitmaps();
        set.Find("tr").Should().BeNull();
        foreach (var name in new[] { "pa", "p4k", "pd" })
        {
            var b = set.Get(name);
            b.Persistent.Should().BeTrue();
            b.Sha256().Should().Be(sha[name], name);
        }
        set.Get("pd").Recording.Should().BeFalse();
        set.Get("pa").Recording.Should().BeTrue();
        // Read-write: flagged in use on disk while open.
        ImageBitmaps(img).Should().OnlyContain(b => b.Flags.Contains("in-use"));
        QemuTools.CheckClean(img);
        await graph.CloseAllAsync();
        ImageBitmaps(img).Should().OnlyContain(b => !b.Flags.Contains("in-use"));
    }

    [Fact]
    public async Task Read_only_open_loads_read_only_bitmaps_and_leaves_the_image_alone()
    {
        var img = Create();
        QemuTools.Img("bitmap", "--add", img, "b0");
        QemuTools.Img("bitmap", "--add", "-g", "4096", "--disable", img, "b1");
        var before = await File.ReadAllBytesAsync(img);
        var (graph, node) = await Qcow2Open.OpenAsync(img, readOnly: true);
        var b0 = node.GetDirtyBitmaps().Get("b0");
        b0.ReadOnly.Should().BeTrue();
        b0.Inconsistent.Should().BeFalse();
        node.GetDirtyBitmaps().Get("b1").Granularity.Should().Be(4096);
        var act = () => node.GetDirtyBitmaps().Clear("b0");
        act.Should().Throw<BlockException>().WithMessage("Bitmap 'b0' is readonly and cannot be modified");
        await graph.CloseAllAsync();
        (await File.ReadAllBytesAsync(img)).Should().Equal(before);
    }

    [Fact]
    public async Task A_bitmap_found_in_use_is_inconsistent_and_removing_it_frees_its_clusters()
    {
        var img = Create();
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        node.GetDirtyBitmaps().Add("pb", persistent: true);
        await node.WriteAsync(0, new byte[1 << 20]);
        await graph.CloseAllAsync();
        await PatchFirstEntryFlagsAsync(img, Qcow2BitmapDirectoryEntry.FlagInUse | Qcow2BitmapDirectoryEntry.FlagAuto);

        (graph, node) = await Qcow2Open.OpenAsync(img);
        var pb = node.GetDirtyBitmaps().Get("pb");
        pb.Inconsistent.Should().BeTrue();
        pb.Recording.Should().BeFalse();
        pb.Count.Should().Be(0);
        var act = () => pb.Check(BitmapCheck.AllowReadOnly);
        act.Should().Throw<BlockException>().WithMessage("Bitmap 'pb' is inconsistent and cannot be used");
        node.GetDirtyBitmaps().Remove("pb");
        await ((IPersistentBitmapStore)node).RemoveStoredAsync("pb", CancellationToken.None);
        ImageBitmaps(img).Should().BeEmpty();
        QemuTools.CheckClean(img);
        await graph.CloseAllAsync();
        QemuTools.CheckClean(img);
        ImageBitmaps(img).Should().BeEmpty();
    }

    [Fact]
    public async Task An_inconsistent_bitmap_stays_in_use_on_disk_across_clean_closes()
    {
        var img = Create();
        QemuTools.Img("bitmap", "--add", img, "q");
        await PatchFirstEntryFlagsAsync(img, Qcow2BitmapDirectoryEntry.FlagInUse);
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        node.GetDirtyBitmaps().Get("q").Inconsistent.Should().BeTrue();
        await graph.CloseAllAsync();
        ImageBitmaps(img).Should().ContainSingle().Which.Flags.Should().Equal("in-use");
        QemuTools.CheckClean(img);
    }

    [Fact]
    public async Task Empty_data_clusters_are_zero_entries_and_restarts_do_not_leak()
    {
        var img = Create();
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        node.GetDirtyBitmaps().Add("empty", persistent: true);
        await graph.CloseAllAsync();
        var entry = await FirstEntryAsync(img);
        var table = new byte[8];
        await using (var f = File.OpenRead(img))
        {
            f.Position = (long)entry.TableOffset;
            await f.ReadExactlyAsync(table);
        }
        BinaryPrimitives.ReadUInt64BigEndian(table).Should().Be(0, "an all-zero data cluster is not written");

        var length = new FileInfo(img).Length;
        for (var i = 0; i < 5; i++)
        {
            (graph, node) = await Qcow2Open.OpenAsync(img);
            await node.WriteAsync(i << 20, new byte[4096]);
            await graph.CloseAllAsync();
            QemuTools.CheckClean(img);
        }
        // Five data clusters, plus the bitmap's data cluster, table and directory written before the old ones go.
        new FileInfo(img).Length.Should().BeLessThanOrEqualTo(length + 12 * 65536);
        // Without writes, each close reuses the clusters the previous one freed: the file stops growing.
        length = new FileInfo(img).Length;
        for (var i = 0; i < 4; i++)
        {
            (graph, _) = await Qcow2Open.OpenAsync(img);
            await graph.CloseAllAsync();
        }
        new FileInfo(img).Length.Should().Be(length);
        QemuTools.CheckClean(img);
    }

    [Fact]
    public async Task Small_clusters_need_multi_cluster_tables_and_directories()
    {
        // 512-byte clusters: a table cluster holds 64 entries of 4096 granules; 256 MiB at 512 B needs 128.
        var img = Create("256M", 512);
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        var set = node.GetDirtyBitmaps();
        set.Add("fine", 512, persistent: true);
        var longName = new string('l', 400);
        set.Add(longName, persistent: true);
        set.Add(longName + "2", persistent: true);
        for (long off = 0; off < 256L << 20; off += 7L << 20)
        {
            await node.WriteAsync(off, new byte[512]);
        }
        var sha = set.Get("fine").Sha256();
        await graph.CloseAllAsync();
        QemuTools.CheckClean(img);
        var (ext, dir) = await ReadDirectoryAsync(img);
        Qcow2BitmapDirectory.TryRead(dir, ext.NbBitmaps, 256L << 20, 512, new FileInfo(img).Length, out var entries, out var error)
            .Should().BeTrue(error);
        entries.Single(e => e.Name == "fine").TableSize.Should().Be(128);
        ext.DirectorySize.Should().BeGreaterThan(512);

        (graph, node) = await Qcow2Open.OpenAsync(img);
        node.GetDirtyBitmaps().Get("fine").Sha256().Should().Be(sha);
        node.GetDirtyBitmaps().Find(longName + "2").Should().NotBeNull();
        await graph.CloseAllAsync();
        QemuTools.CheckClean(img);
    }

    [Fact]
    public async Task A_corrupt_directory_fails_the_open_with_a_clear_error()
    {
        var img = Create();
        QemuTools.Img("bitmap", "--add", img, "b0");
        await PatchFirstEntryAsync(img, e => e[16] = 7);
        var act = () => Qcow2Open.OpenAsync(img);
        (await act.Should().ThrowAsync<BlockException>()).Which.Message.Should().Be("Bitmap 'b0' doesn't satisfy the constraints");
    }

    [Fact]
    public async Task Limits_are_checked_before_a_persistent_bitmap_is_created()
    {
        var img = Create("2T");
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        var store = (IPersistentBitmapStore)node;
        store.CheckCanStoreNew("ok", 512);
        var act = () => store.CheckCanStoreNew(new string('n', 1024), 65536);
        act.Should().Throw<BlockException>().WithMessage("Can't make bitmap '*' persistent in 'img': Name length exceeds maximum (1023 characters)");
        await graph.CloseAllAsync();

        var big = _dir.File("big.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", big, ((2L << 40) + 512).ToString());
        (graph, node) = await Qcow2Open.OpenAsync(big);
        act = () => ((IPersistentBitmapStore)node).CheckCanStoreNew("x", 512);
        act.Should().Throw<BlockException>()
            .WithMessage("Can't make bitmap 'x' persistent in 'img': Too much space will be occupied by the bitmap. Use larger granularity");
        await graph.CloseAllAsync();
    }

    // ------------------------------------------------------------------ helpers

    private static async Task<(Qcow2BitmapsExtension Ext, byte[] Directory)> ReadDirectoryAsync(string img)
    {
        var bytes = await File.ReadAllBytesAsync(img);
        Qcow2HeaderCluster.TryRead(bytes, out var hc, out var error).Should().BeTrue(error);
        var raw = hc!.Extensions.Single(e => e.Type == Qcow2HeaderExtension.Bitmaps);
        Qcow2BitmapsExtension.TryRead(raw.Data, hc.Header.ClusterSize, out var ext, out error).Should().BeTrue(error);
        return (ext, bytes.AsSpan((int)ext.DirectoryOffset, (int)ext.DirectorySize).ToArray());
    }

    private static async Task<Qcow2BitmapDirectoryEntry> FirstEntryAsync(string img)
    {
        var (_, dir) = await ReadDirectoryAsync(img);
        Qcow2BitmapDirectoryEntry.TryRead(dir, out var entry, out _).Should().BeTrue();
        return entry!;
    }

    private static async Task PatchFirstEntryAsync(string img, Action<byte[]> patch)
    {
        var (ext, dir) = await ReadDirectoryAsync(img);
        patch(dir);
        await using var f = new FileStream(img, FileMode.Open, FileAccess.Write);
        f.Position = (long)ext.DirectoryOffset;
        await f.WriteAsync(dir);
    }

    private static Task PatchFirstEntryFlagsAsync(string img, uint flags) =>
        PatchFirstEntryAsync(img, d => BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(12), flags));

    [Fact]
    public async Task Image_info_lists_the_stored_bitmaps_as_QSD_does()
    {
        var img = Create();
        QemuTools.Img("bitmap", "--add", img, "b0");
        QemuTools.Img("bitmap", "--add", "--disable", "-g", "4096", img, "b1");
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        try
        {
            var json = System.Text.Json.JsonSerializer.Serialize(node.GetImageInfo().FormatSpecific!.Data
                .First(kv => kv.Key == "bitmaps").Value);
            json.Should().Be("""[[{"Key":"flags","Value":["in-use","auto"]},{"Key":"name","Value":"b0"},{"Key":"granularity","Value":65536}],""" +
                """[{"Key":"flags","Value":["in-use"]},{"Key":"name","Value":"b1"},{"Key":"granularity","Value":4096}]]""");
        }
        finally
        {
            await graph.CloseAllAsync();
        }
    }
}
