namespace Backup.Block.Tests.Qcow2;

/// <summary>Images written by qemu-img / qemu-io read byte-identical to qemu-img convert -O raw.</summary>
public sealed class Qcow2ReadTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    public static TheoryData<int, string> Layouts()
    {
        var data = new TheoryData<int, string>();
        foreach (var cs in new[] { 512, 4096, 65536, 2 << 20 })
        {
            foreach (var compat in new[] { "0.10", "1.1" })
            {
                data.Add(cs, compat);
            }
        }
        return data;
    }

    private static string[] PatternWrites(long size, int clusterSize) =>
    [
        "write -P 0x11 0 4096",
        $"write -P 0x22 {clusterSize - 100} 300",
        $"write -P 0x33 {size / 2 + 17} {3 * clusterSize + 5}",
        $"write -P 0x44 {size - 512} 512",
        $"write -z {size / 4} {2 * clusterSize}",
        $"write -P 0x55 {size / 4 + clusterSize / 2} 1000",
        $"discard {size / 2 + clusterSize} {clusterSize}",
    ];

    [Theory]
    [MemberData(nameof(Layouts))]
    public async Task Reads_match_qemu_img_convert(int clusterSize, string compat)
    {
        var size = clusterSize == 512 ? 4L << 20 : 64L << 20;
        var img = _dir.File("a.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize},compat={compat}", img, size.ToString());
        QemuTools.Io(img, PatternWrites(size, clusterSize));
        var expected = QemuTools.ConvertToRaw(img, _dir.Path);

        var (graph, node) = await Qcow2Open.OpenAsync(img, readOnly: true);
        try
        {
            node.Length.Should().Be(size);
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(expected);
            // Unaligned small reads across cluster boundaries too.
            var buf = new byte[777];
            var at = size / 2 + clusterSize - 300;
            await node.ReadAsync(at, buf);
            buf.Should().Equal(expected.AsSpan((int)at, 777).ToArray());
        }
        finally
        {
            await graph.CloseAllAsync();
        }
    }

    [Theory]
    [InlineData(65536, "1.1")]
    [InlineData(4096, "0.10")]
    [InlineData(512, "1.1")]
    public async Task Backing_chain_reads_through_and_matches_convert(int clusterSize, string compat)
    {
        var size = 8L << 20;
        var baseImg = _dir.File("base.qcow2");
        var mid = _dir.File("mid.qcow2");
        var top = _dir.File("top.qcow2");
        // The base is smaller than the top: the tail reads as zeros.
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize},compat={compat}", baseImg, (size / 2).ToString());
        QemuTools.Io(baseImg, "write -P 0xa1 0 1M", "write -P 0xa2 3M 1M");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize},compat={compat}", "-b", "base.qcow2", "-F", "qcow2", mid, size.ToString());
        QemuTools.Io(mid, "write -P 0xb1 512k 100k", "write -P 0xb2 6M 4k");
        // No backing format in the header: the driver probes it.
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize},compat={compat}", "-b", mid, "-F", "qcow2", top, size.ToString());
        QemuTools.Io(top, "write -P 0xc1 700k 3000", "write -z 3M 64k");
        var expected = QemuTools.ConvertToRaw(top, _dir.Path);

        var (graph, node) = await Qcow2Open.OpenAsync(top, readOnly: true);
        try
        {
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(expected);
            node.Children.Select(c => c.Role).Should().Equal("file", "backing");
            var info = node.GetImageInfo();
            info.BackingFilename.Should().Be(mid);
            info.FullBackingFilename.Should().Be(mid);
            info.BackingFilenameFormat.Should().Be("qcow2");
            info.BackingImage!.BackingFilename.Should().Be("base.qcow2");
            info.BackingImage.FullBackingFilename.Should().Be(baseImg);

            // Block status: top layer, backing layers, and nothing.
            var s = await node.GetBlockStatusAsync(700 * 1024, 100);
            s.Depth.Should().Be(1);
            s.IsAllocated.Should().BeTrue();
            s = await node.GetBlockStatusAsync(512 * 1024 + 100 * 1024 - 10, 1);
            s.Depth.Should().Be(2);
            s.IsAllocated.Should().BeFalse();
            s.IsData.Should().BeTrue();
            s = await node.GetBlockStatusAsync(0, 4096);
            s.Depth.Should().Be(3);
            s = await node.GetBlockStatusAsync(3L << 20, 64 * 1024);
            (s.Depth, s.IsZero, s.IsAllocated).Should().Be((1, compat == "1.1", true));
            s = await node.GetBlockStatusAsync(size - 4096, 4096);
            (s.Depth, s.IsZero, s.IsAllocated).Should().Be((0, true, false));
        }
        finally
        {
            await graph.CloseAllAsync();
        }
    }

    [Theory]
    [InlineData(65536)]
    [InlineData(4096)]
    [InlineData(512)]
    [InlineData(2 << 20)]
    public async Task Compressed_clusters_read_back(int clusterSize)
    {
        var raw = _dir.File("src.raw");
        var rng = new Random(clusterSize);
        var content = new byte[8 << 20];
        for (var i = 0; i < content.Length; i += 4096)
        {
            // A mix of compressible text-like runs, random (incompressible) blocks and zeros.
            switch (rng.Next(3))
            {
                case 0:
                    Array.Fill(content, (byte)rng.Next(256), i, 4096);
                    content[i + rng.Next(4096)] = 7;
                    break;
                case 1:
                    rng.NextBytes(content.AsSpan(i, 4096));
                    break;
            }
        }
        await File.WriteAllBytesAsync(raw, content);
        var img = _dir.File("c.qcow2");
        QemuTools.Img("convert", "-c", "-O", "qcow2", "-o", $"cluster_size={clusterSize}", raw, img);
        QemuTools.CheckNoCorruption(img).GetProperty("compressed-clusters").GetInt32()
            .Should().BePositive("the image must really hold compressed clusters");

        var (graph, node) = await Qcow2Open.OpenAsync(img, readOnly: true);
        try
        {
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(content);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
    }
}
