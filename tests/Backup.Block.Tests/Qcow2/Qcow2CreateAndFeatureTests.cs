using System.Buffers.Binary;
using Backup.Block.Drivers.Qcow2;

namespace Backup.Block.Tests.Qcow2;

public sealed class Qcow2CreateAndFeatureTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static async Task CreateAsync(string path, Qcow2CreateOptions options)
    {
        await File.WriteAllBytesAsync(path, []);
        var graph = BlockGraph.CreateDefault();
        try
        {
            var file = await graph.AddAsync(new BlockOptions { ["driver"] = "file", ["node-name"] = "f", ["filename"] = path });
            await Qcow2Creator.CreateAsync(file, options);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
    }

    public static TheoryData<Qcow2CreateOptions> CreateCases() => new()
    {
        new Qcow2CreateOptions { Size = 64L << 20 },
        new Qcow2CreateOptions { Size = 1L << 30, ClusterSize = 512 },
        new Qcow2CreateOptions { Size = 10L << 30, ClusterSize = 4096, RefcountBits = 1 },
        new Qcow2CreateOptions { Size = 100L << 30, ClusterSize = 2 << 20, RefcountBits = 64, LazyRefcounts = true },
        new Qcow2CreateOptions { Size = 64L << 20, Version = Qcow2Version.V2 },
        new Qcow2CreateOptions { Size = 16L << 20, Preallocation = Qcow2Preallocation.Metadata },
        new Qcow2CreateOptions { Size = 3L << 20, ClusterSize = 512, Preallocation = Qcow2Preallocation.Metadata, Version = Qcow2Version.V2 },
    };

    [Theory]
    [MemberData(nameof(CreateCases))]
    public async Task Created_images_pass_qemu_img_check_and_info(Qcow2CreateOptions options)
    {
        var img = _dir.File("new.qcow2");
        await CreateAsync(img, options);
        QemuTools.CheckClean(img);
        var info = QemuTools.Info(img);
        info.GetProperty("format").GetString().Should().Be("qcow2");
        info.GetProperty("virtual-size").GetInt64().Should().Be(options.Size);
        info.GetProperty("cluster-size").GetInt32().Should().Be(options.ClusterSize);
        var data = info.GetProperty("format-specific").GetProperty("data");
        data.GetProperty("compat").GetString().Should().Be(options.Version == Qcow2Version.V3 ? "1.1" : "0.10");
        data.GetProperty("refcount-bits").GetInt32().Should().Be(options.RefcountBits);
        if (options.Version == Qcow2Version.V3)
        {
            data.GetProperty("lazy-refcounts").GetBoolean().Should().Be(options.LazyRefcounts);
        }
        if (options.Preallocation == Qcow2Preallocation.Metadata)
        {
            var map = QemuTools.Img("map", "--output=json", img);
            map.Should().Contain("\"data\": true").And.NotContain("\"data\": false");
        }

        // The image works: qemu-io writes, we read; we write, qemu-img reads.
        QemuTools.Io(img, "write -P 0x3c 4096 8192");
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        try
        {
            var buf = new byte[8192];
            await node.ReadAsync(4096, buf);
            buf.Should().AllBeEquivalentTo((byte)0x3c);
            var mine = new byte[100_000];
            Array.Fill(mine, (byte)0xe1);
            await node.WriteAsync(options.Size / 2 + 3, mine);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(img);
        QemuTools.Io(img, $"read -P 0xe1 {options.Size / 2 + 3} 100000", "read -P 0x3c 4096 8192");
    }

    [Theory]
    [InlineData("cluster_size=65536", 64L << 20, 65536, "v3", 16, false, false)]
    [InlineData("compat=0.10", 64L << 20, 65536, "v2", 16, false, false)]
    [InlineData("cluster_size=4096,lazy_refcounts=on", 1L << 30, 4096, "v3", 16, true, false)]
    [InlineData("refcount_bits=64", 10L << 30, 65536, "v3", 64, false, false)]
    [InlineData("backing_file=base.qcow2,backing_fmt=qcow2", 1L << 20, 65536, "v3", 16, false, true)]
    public async Task Created_images_are_laid_out_like_qemu_img_s(string qemuOptions, long size, int clusterSize,
        string version, int refcountBits, bool lazy, bool backing)
    {
        var baseImg = _dir.File("base.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", baseImg, "1M");
        var theirs = _dir.File("theirs.qcow2");
        var ours = _dir.File("ours.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", qemuOptions, theirs, size.ToString());
        await CreateAsync(ours, new Qcow2CreateOptions
        {
            Size = size,
            ClusterSize = clusterSize,
            Version = version == "v2" ? Qcow2Version.V2 : Qcow2Version.V3,
            RefcountBits = refcountBits,
            LazyRefcounts = lazy,
            BackingFile = backing ? "base.qcow2" : null,
            BackingFormat = backing ? "qcow2" : null,
        });
        var a = await File.ReadAllBytesAsync(theirs);
        var b = await File.ReadAllBytesAsync(ours);
        b.Length.Should().Be(a.Length);
        var diff = Enumerable.Range(0, a.Length).FirstOrDefault(i => a[i] != b[i], -1);
        diff.Should().Be(-1, $"byte {diff} differs: qemu-img wrote {(diff < 0 ? 0 : a[diff]):x2}, we wrote {(diff < 0 ? 0 : b[diff]):x2}");
    }

    [Fact]
    public async Task Created_image_with_backing_file_reads_through()
    {
        var baseImg = _dir.File("base.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", baseImg, "8M");
        QemuTools.Io(baseImg, "write -P 0x42 0 1M");
        var top = _dir.File("top.qcow2");
        await CreateAsync(top, new Qcow2CreateOptions { Size = 8L << 20, BackingFile = "base.qcow2", BackingFormat = "qcow2" });
        QemuTools.CheckClean(top);
        var info = QemuTools.Info(top);
        info.GetProperty("backing-filename").GetString().Should().Be("base.qcow2");
        info.GetProperty("backing-filename-format").GetString().Should().Be("qcow2");
        QemuTools.Io(top, "read -P 0x42 0 1M");
        var (graph, node) = await Qcow2Open.OpenAsync(top);
        try
        {
            await node.WriteAsync(100, new byte[] { 1, 2, 3 });
            var buf = new byte[1 << 20];
            await node.ReadAsync(0, buf);
            buf.Take(100).Should().AllBeEquivalentTo((byte)0x42);
            buf.Skip(100).Take(3).Should().Equal(1, 2, 3);
            buf.Skip(103).Should().AllBeEquivalentTo((byte)0x42);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(top);
    }

    [Theory]
    [InlineData(512, "v2")]
    [InlineData(5000, "cluster")]
    [InlineData(3, "refcount")]
    public async Task Creator_rejects_bad_options(int value, string which)
    {
        var options = which switch
        {
            "v2" => new Qcow2CreateOptions { Size = 1 << 20, Version = Qcow2Version.V2, RefcountBits = 64 },
            "cluster" => new Qcow2CreateOptions { Size = 1 << 20, ClusterSize = value },
            _ => new Qcow2CreateOptions { Size = 1 << 20, RefcountBits = value },
        };
        var act = () => CreateAsync(_dir.File("bad.qcow2"), options);
        await act.Should().ThrowAsync<BlockException>();
    }

    [Fact]
    public async Task Image_info_matches_what_qsd_reports()
    {
        var v3 = _dir.File("v3.qcow2");
        var v2 = _dir.File("v2.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", v3, "64M");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "64M");
        var (g3, n3) = await Qcow2Open.OpenAsync(v3, readOnly: true);
        var (g2, n2) = await Qcow2Open.OpenAsync(v2, readOnly: true);
        try
        {
            var i3 = n3.GetImageInfo();
            (i3.Format, i3.VirtualSize, i3.ClusterSize, i3.Filename, i3.DirtyFlag).Should().Be(("qcow2", 64L << 20, 65536, v3, false));
            i3.ActualSize.Should().BePositive();
            i3.BackingFilename.Should().BeNull();
            i3.FormatSpecific!.Type.Should().Be("qcow2");
            i3.FormatSpecific.Data.Select(kv => kv.Key).Should().Equal(
                "compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2");
            i3.FormatSpecific.Data.Select(kv => kv.Value).Should().Equal("1.1", "zlib", false, 16, false, false);
            var i2 = n2.GetImageInfo();
            i2.FormatSpecific!.Data.Select(kv => kv.Key).Should().Equal("compat", "compression-type", "refcount-bits");
            i2.FormatSpecific.Data.Select(kv => kv.Value).Should().Equal("0.10", "zlib", 16);
        }
        finally
        {
            await g3.CloseAllAsync();
            await g2.CloseAllAsync();
        }
    }

    private static async Task PatchHeaderAsync(string path, Func<Qcow2HeaderCluster, Qcow2HeaderCluster> change)
    {
        var bytes = await File.ReadAllBytesAsync(path);
        Qcow2HeaderCluster.TryRead(bytes, out var hc, out var error).Should().BeTrue(error);
        var updated = change(hc!);
        var buffer = new byte[updated.Size];
        updated.WriteTo(buffer);
        await using var f = new FileStream(path, FileMode.Open, FileAccess.Write);
        await f.WriteAsync(buffer);
    }

    private static Qcow2HeaderCluster ReadHeader(string path)
    {
        var bytes = File.ReadAllBytes(path);
        Qcow2HeaderCluster.TryRead(bytes, out var hc, out var error).Should().BeTrue(error);
        return hc!;
    }

    [Fact]
    public async Task Unknown_incompatible_features_are_refused_with_their_names()
    {
        var img = _dir.File("x.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", img, "1M");
        await PatchHeaderAsync(img, hc => hc with { Header = hc.Header with { IncompatibleFeatures = 1UL << 40 } });
        var act = () => Qcow2Open.OpenAsync(img, readOnly: true);
        (await act.Should().ThrowAsync<BlockException>()).Which.Message
            .Should().Be("Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000");

        var ext = _dir.File("ext.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", ext, "1M");
        act = () => Qcow2Open.OpenAsync(ext, readOnly: true);
        (await act.Should().ThrowAsync<BlockException>()).Which.Message
            .Should().Be("Unsupported qcow2 feature(s): extended L2 entries");
    }

    [Fact]
    public async Task Corrupt_and_dirty_images_open_read_only_only()
    {
        var corrupt = _dir.File("corrupt.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", corrupt, "1M");
        await PatchHeaderAsync(corrupt, hc => hc with { Header = hc.Header with { IncompatibleFeatures = 2 } });
        var act = () => Qcow2Open.OpenAsync(corrupt);
        (await act.Should().ThrowAsync<BlockException>()).Which.Message.Should().Contain("corrupt");
        var (g, n) = await Qcow2Open.OpenAsync(corrupt, readOnly: true);
        n.GetImageInfo().FormatSpecific!.Data.Single(kv => kv.Key == "corrupt").Value.Should().Be(true);
        await g.CloseAllAsync();

        var dirty = _dir.File("dirty.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", dirty, "1M");
        await PatchHeaderAsync(dirty, hc => hc with { Header = hc.Header with { IncompatibleFeatures = 1 } });
        act = () => Qcow2Open.OpenAsync(dirty);
        (await act.Should().ThrowAsync<BlockException>()).Which.Message.Should().Contain("dirty");
        (g, n) = await Qcow2Open.OpenAsync(dirty, readOnly: true);
        n.GetImageInfo().DirtyFlag.Should().BeTrue();
        await g.CloseAllAsync();
    }

    [Fact]
    public async Task Opening_read_write_clears_unknown_autoclear_bits_keeps_bitmaps_and_other_extensions()
    {
        var img = _dir.File("bm.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", img, "4M");
        QemuTools.Img("bitmap", "--add", img, "b0");
        await PatchHeaderAsync(img, hc => hc with
        {
            Header = hc.Header with { AutoclearFeatures = hc.Header.AutoclearFeatures | (1UL << 7) },
            Extensions = [.. hc.Extensions, new Qcow2HeaderExtension(0x12345678, [1, 2, 3, 4, 5])],
        });
        var before = ReadHeader(img);
        before.Header.AutoclearFeatures.Should().Be(Qcow2Header.AutoclearBitmaps | (1UL << 7));
        before.Extensions.Should().Contain(e => e.Type == Qcow2HeaderExtension.Bitmaps);

        // Read-only leaves the header alone.
        var (g, _) = await Qcow2Open.OpenAsync(img, readOnly: true);
        await g.CloseAllAsync();
        ReadHeader(img).Header.AutoclearFeatures.Should().Be(before.Header.AutoclearFeatures);

        (g, var node) = await Qcow2Open.OpenAsync(img);
        await node.WriteAsync(0, new byte[4096]);
        await g.CloseAllAsync();
        var after = ReadHeader(img);
        // Bit 7 is unknown to us and cleared; the bitmaps (bit 0) are ours now, loaded and stored again.
        after.Header.AutoclearFeatures.Should().Be(Qcow2Header.AutoclearBitmaps);
        after.Extensions.Where(e => e.Type != Qcow2HeaderExtension.Bitmaps).Select(e => (e.Type, Convert.ToHexString(e.Data)))
            .Should().Equal(before.Extensions.Where(e => e.Type != Qcow2HeaderExtension.Bitmaps).Select(e => (e.Type, Convert.ToHexString(e.Data))));
        after.Extensions.Select(e => e.Type).Should().Equal(before.Extensions.Select(e => e.Type));
        QemuTools.CheckClean(img);
        var info = QemuTools.Info(img);
        info.GetProperty("format").GetString().Should().Be("qcow2");
        info.GetProperty("format-specific").GetProperty("data").GetProperty("bitmaps")[0].GetProperty("name").GetString().Should().Be("b0");
    }

    [Fact]
    public async Task Backing_option_null_means_no_backing_and_nested_options_are_used()
    {
        var baseImg = _dir.File("base.qcow2");
        var top = _dir.File("top.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", baseImg, "1M");
        QemuTools.Io(baseImg, "write -P 0x42 0 64k");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-b", baseImg, "-F", "qcow2", top, "1M");

        var graph = BlockGraph.CreateDefault();
        try
        {
            var node = await graph.AddAsync(Qcow2Open.Options(top, readOnly: true, includeBacking: true, backing: null));
            node.Children.Should().ContainSingle();
            var buf = new byte[16];
            await node.ReadAsync(0, buf);
            buf.Should().AllBeEquivalentTo((byte)0);

            var raw = _dir.File("base.raw");
            QemuTools.Img("convert", "-O", "raw", baseImg, raw);
            var nested = new BlockOptions
            {
                ["driver"] = "raw",
                ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = raw },
            };
            // Read-only like the first: a writer would be refused while 'img' holds the image (as in QEMU).
            var node2 = await graph.AddAsync(Qcow2Open.Options(top, readOnly: true, nodeName: "img2", includeBacking: true, backing: nested));
            await node2.ReadAsync(0, buf);
            buf.Should().AllBeEquivalentTo((byte)0x42);
            node2.Children[1].Node.ReadOnly.Should().BeTrue();
            (await node2.GetBlockStatusAsync(0, 4096)).Depth.Should().Be(2);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
    }

    [Fact]
    public async Task Tunable_options_are_accepted()
    {
        var img = _dir.File("t.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", img, "1M");
        var o = Qcow2Open.Options(img);
        o["lazy-refcounts"] = true;
        o["cache-size"] = 1L << 20;
        o["l2-cache-entry-size"] = 4096L;
        o["cache-clean-interval"] = 600L;
        o["pass-discard-request"] = true;
        o["pass-discard-snapshot"] = true;
        o["pass-discard-other"] = false;
        o["discard-no-unref"] = false;
        o["overlap-check"] = "constant";
        var graph = BlockGraph.CreateDefault();
        await graph.AddAsync(o);
        await graph.CloseAllAsync();
        QemuTools.CheckClean(img);
        BinaryPrimitives.ReadUInt32BigEndian(File.ReadAllBytes(img).AsSpan(4)).Should().Be(3);
    }
}
