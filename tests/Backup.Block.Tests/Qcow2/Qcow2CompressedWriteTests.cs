using System.Text;

namespace Backup.Block.Tests.Qcow2;

/// <summary>
/// Compressed cluster writes (backup's compress option) mixed with normal writes, overwrites and discards
/// of compressed clusters, checked against a model, then with qemu-img check (clean: the shared host
/// clusters' refcounts are exact) and qemu-img compare (QEMU inflates what we deflated).
/// </summary>
public sealed class Qcow2CompressedWriteTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>Text-like data that deflates well, with repeats further back than QEMU's 4 KiB window.</summary>
    private static byte[] Compressible(Random rng, int length)
    {
        var sb = new StringBuilder();
        var block = string.Concat(Enumerable.Range(0, 200).Select(i => $"line {rng.Next(1000)} of a compressible cluster\n"));
        while (sb.Length < length)
        {
            sb.Append(block);
        }
        return Encoding.ASCII.GetBytes(sb.ToString(0, length));
    }

    [Theory]
    [InlineData(65536)]
    [InlineData(4096)]
    [InlineData(512)]
    public async Task Compressed_clusters_read_back_and_check_clean(int clusterSize)
    {
        // An odd size: the last cluster is partial and is compressed padded with zeros.
        var size = (4L << 20) + 1536;
        var image = _dir.File("c.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", image, size.ToString());
        var model = new byte[size];
        var clusters = (int)((size + clusterSize - 1) / clusterSize);
        var rng = new Random(clusterSize);
        var (graph, node) = await Qcow2Open.OpenAsync(image, discard: "unmap");
        try
        {
            node.SupportsCompressedWrites.Should().BeTrue();
            var compressedOnce = new HashSet<int>();
            for (var op = 0; op < 400; op++)
            {
                var c = rng.Next(clusters);
                var off = (long)c * clusterSize;
                var len = (int)Math.Min(clusterSize, size - off);
                var kind = rng.Next(100);
                if (kind < 50)
                {
                    // Random data fills only whole clusters: the last, partial one is padded with zeros,
                    // which always compresses.
                    var random = rng.Next(4) == 0 && len == clusterSize;
                    var data = random ? RandomBytes(rng, len) : Compressible(rng, len);
                    // Data that does not compress is written normally, over anything (as QEMU does).
                    if (!random && await IsAllocatedAsync(node, off))
                    {
                        // QEMU: compression can't overwrite anything.
                        var act = async () => await node.WriteCompressedAsync(off, data);
                        (await act.Should().ThrowAsync<IOException>()).Which.Message.Should().Be("Input/output error");
                        continue;
                    }
                    await node.WriteCompressedAsync(off, data);
                    data.CopyTo(model, off);
                    compressedOnce.Add(c);
                }
                else if (kind < 70)
                {
                    // A normal write over part of a cluster: copy-on-write out of a compressed one.
                    var at = off + rng.Next(len);
                    var n = (int)Math.Min(rng.Next(1, 3 * clusterSize), size - at);
                    var data = RandomBytes(rng, n);
                    await node.WriteAsync(at, data);
                    data.CopyTo(model, at);
                }
                else if (kind < 80)
                {
                    // Frees the compressed data's share of its host clusters.
                    await node.DiscardAsync(off, len);
                    var after = new byte[len];
                    await node.ReadAsync(off, after);
                    after.CopyTo(model, off);
                }
                else if (kind < 95)
                {
                    var buf = new byte[len];
                    await node.ReadAsync(off, buf);
                    buf.Should().Equal(model.AsSpan((int)off, len).ToArray(), $"cluster {c} after op {op}");
                }
                else
                {
                    await node.FlushAsync();
                }
            }
            compressedOnce.Should().NotBeEmpty();
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(model);
        }
        finally
        {
            await graph.CloseAllAsync();
        }

        QemuTools.CheckClean(image);
        var raw = _dir.File("model.raw");
        await File.WriteAllBytesAsync(raw, model);
        QemuTools.Img("compare", "-f", "qcow2", "-F", "raw", image, raw);
    }

    [Fact]
    public async Task Incompressible_data_is_written_as_a_normal_cluster()
    {
        var image = _dir.File("r.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", image, "1M");
        var data = RandomBytes(new Random(1), 65536);
        var (graph, node) = await Qcow2Open.OpenAsync(image);
        try
        {
            await node.WriteCompressedAsync(65536, data);
            await node.WriteCompressedAsync(0, Compressible(new Random(2), 65536));
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(image);
        var map = QemuTools.Img("map", "--output=json", image);
        // The compressed cluster has no host offset in the map; the random one has.
        map.Should().Contain("\"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true}");
        map.Should().MatchRegex("\"start\": 65536, \"length\": 65536, [^}]*\"offset\": \\d+");
    }

    private static async Task<bool> IsAllocatedAsync(BlockNode node, long offset)
    {
        var st = await node.GetBlockStatusAsync(offset, 1);
        return st.IsAllocated && st.IsData;
    }

    private static byte[] RandomBytes(Random rng, int n)
    {
        var b = new byte[n];
        rng.NextBytes(b);
        return b;
    }
}
