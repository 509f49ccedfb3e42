using Backup.Block.Drivers.Qcow2;

namespace Backup.Block.Tests.Qcow2;

/// <summary>
/// External data files (qcow2.txt incompatible bit 2, extension 0x44415441, autoclear data-file-raw):
/// images created in process and by qemu-img, random workloads against a model, and qemu-img's verdict.
/// </summary>
public sealed class Qcow2DataFileTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static BlockOptions FileOptions(string path) => new() { ["driver"] = "file", ["filename"] = path };

    /// <summary>Creates meta + data with <see cref="Qcow2Creator"/>, as a daemon job would.</summary>
    private static async Task CreateAsync(string meta, string data, long size, bool raw, int clusterSize = 65536)
    {
        await File.WriteAllBytesAsync(meta, []);
        await File.WriteAllBytesAsync(data, []);
        var graph = BlockGraph.CreateDefault();
        try
        {
            var file = await graph.AddAsync(new BlockOptions(FileOptions(meta)) { ["node-name"] = "m" });
            var dataFile = await graph.AddAsync(new BlockOptions(FileOptions(data)) { ["node-name"] = "d" });
            await Qcow2Creator.CreateAsync(file, new Qcow2CreateOptions
            {
                Size = size, ClusterSize = clusterSize, DataFile = dataFile, DataFileRaw = raw,
            });
        }
        finally
        {
            await graph.CloseAllAsync();
        }
    }

    [Theory]
    [InlineData(true, 65536)]
    [InlineData(false, 65536)]
    [InlineData(true, 4096)]
    [InlineData(false, 512)]
    public async Task Random_workload_matches_model_and_qemu_img_agrees(bool raw, int clusterSize)
    {
        var meta = _dir.File("meta.qcow2");
        var data = _dir.File("data.raw");
        const long size = 8L << 20;
        await CreateAsync(meta, data, size, raw, clusterSize);
        var info = QemuTools.Info(meta).GetProperty("format-specific").GetProperty("data");
        info.GetProperty("data-file").GetString().Should().Be(data);
        info.GetProperty("data-file-raw").GetBoolean().Should().Be(raw);
        new FileInfo(data).Length.Should().Be(size, "creation grows the data file to the virtual size");

        var model = new byte[size];
        var graph = BlockGraph.CreateDefault();
        try
        {
            var node = await graph.AddAsync(new BlockOptions(Qcow2Open.Options(meta, discard: "unmap"))
            {
                ["data-file"] = new BlockOptions(FileOptions(data)) { ["discard"] = "unmap" },
            });
            var rng = new Random(clusterSize + (raw ? 1 : 0));
            for (var op = 0; op < 300; op++)
            {
                var off = rng.NextInt64(0, size - 1);
                var len = (int)Math.Min(rng.Next(1, 3 * clusterSize), size - off);
                switch (rng.Next(10))
                {
                    case < 6:
                        var bytes = new byte[len];
                        rng.NextBytes(bytes);
                        await node.WriteAsync(off, bytes);
                        bytes.CopyTo(model, off);
                        break;
                    case < 8:
                        await node.WriteZeroesAsync(off, len, rng.Next(2) == 0 ? WriteFlags.MayUnmap : WriteFlags.None);
                        Array.Clear(model, (int)off, len);
                        break;
                    default:
                        var buf = new byte[len];
                        await node.ReadAsync(off, buf);
                        buf.Should().Equal(model.AsSpan((int)off, len).ToArray(), $"read at {off}+{len} after op {op}");
                        break;
                }
            }
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(model);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(meta);
        var modelPath = _dir.File("model.raw");
        await File.WriteAllBytesAsync(modelPath, model);
        QemuTools.Img("compare", "-f", "qcow2", "-F", "raw", meta, modelPath);
        if (raw)
        {
            // data-file-raw: the data file alone is the disk, byte for byte.
            (await File.ReadAllBytesAsync(data)).Should().Equal(model);
        }
        // The metadata file holds no guest data: header, refcounts, L1 and L2 tables only (it may be
        // sparse past its end, where the allocation reserve's refcount blocks went).
        QemuTools.Info(meta).GetProperty("actual-size").GetInt64().Should().BeLessThan(1L << 20);
    }

    [Fact]
    public async Task Qemu_img_images_open_through_the_header_name_both_ways()
    {
        var meta = _dir.File("q.qcow2");
        var data = _dir.File("q.raw");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"data_file={data},data_file_raw=on", meta, "4M");
        QemuTools.Io(meta, "write -P 0x21 0 100000");
        var (graph, node) = await Qcow2Open.OpenAsync(meta);
        try
        {
            node.Children.Select(c => c.Role).Should().Contain("data-file");
            var buf = new byte[100000];
            await node.ReadAsync(0, buf);
            buf.Should().AllBeEquivalentTo((byte)0x21);
            var mine = new byte[200000];
            Array.Fill(mine, (byte)0x42);
            await node.WriteAsync(1 << 20, mine);
            var info = node.GetImageInfo().FormatSpecific!.Data.ToDictionary(kv => kv.Key, kv => kv.Value);
            info["data-file"].Should().Be(data);
            info["data-file-raw"].Should().Be(true);
            node.SupportsCompressedWrites.Should().BeFalse("compressed clusters would live in the image file, which data-file images never map");
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(meta);
        QemuTools.Io(meta, "read -P 0x21 0 100000", "read -P 0x42 1M 200000");
        QemuTools.Ok("qemu-io", "-f", "raw", "-c", "read -P 0x42 1M 200000", data);
    }

    [Fact]
    public async Task Data_file_option_on_an_image_without_one_and_missing_data_file_are_refused()
    {
        var plain = _dir.File("plain.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", plain, "1M");
        var graph = BlockGraph.CreateDefault();
        try
        {
            var act = async () => await graph.AddAsync(new BlockOptions(Qcow2Open.Options(plain))
            {
                ["data-file"] = FileOptions(_dir.File("x.raw")),
            });
            (await act.Should().ThrowAsync<BlockException>()).Which.Message
                .Should().Be("'data-file' can only be set for images with an external data file");
        }
        finally
        {
            await graph.CloseAllAsync();
        }

        var meta = _dir.File("m.qcow2");
        var data = _dir.File("gone.raw");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"data_file={data}", meta, "1M");
        File.Delete(data);
        var open = async () => await Qcow2Open.OpenAsync(meta);
        (await open.Should().ThrowAsync<BlockException>()).Which.Message.Should().Be($"Could not open '{data}': No such file or directory");
    }
}
