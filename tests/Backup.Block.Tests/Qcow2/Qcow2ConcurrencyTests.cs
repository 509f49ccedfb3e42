namespace Backup.Block.Tests.Qcow2;

/// <summary>
/// Allocating writes run their data I/O outside the metadata lock, with in-flight ranges that make
/// overlapping changes wait. These tests race writers, zeroers and readers over clusters they share,
/// with an L2 cache of two tables so that tables leave the cache while allocations are in flight.
/// </summary>
public sealed class Qcow2ConcurrencyTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Theory]
    [InlineData(4096, true)]
    [InlineData(65536, false)]
    [InlineData(512, true)]
    public async Task Workers_sharing_clusters_with_evicting_cache_lose_nothing(int clusterSize, bool withBacking)
    {
        const long Size = 16L << 20;
        const int Workers = 8;
        var stripe = clusterSize * 3;
        var top = _dir.File("top.qcow2");
        if (withBacking)
        {
            var baseImg = _dir.File("base.qcow2");
            QemuTools.Img("create", "-q", "-f", "qcow2", baseImg, Size.ToString());
            QemuTools.Io(baseImg, "write -P 0x5a 0 16M");
            QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", "-b", "base.qcow2", "-F", "qcow2", top);
        }
        else
        {
            QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", top, Size.ToString());
        }
        var model = QemuTools.ConvertToRaw(top, _dir.Path);
        // Few stripes per worker, so that neighbours often work on their shared clusters at once.
        var stripes = (int)Math.Min(Size / stripe, Workers * 4 + 1);

        var graph = BlockGraph.CreateDefault();
        try
        {
            // discard=unmap: zeroed whole clusters lose their host cluster, so later writes allocate again.
            var node = await graph.AddAsync(new BlockOptions(Qcow2Open.Options(top, discard: "unmap"))
            {
                ["l2-cache-size"] = 2L * clusterSize,
                ["refcount-cache-size"] = 2L * clusterSize,
            });
            var tasks = Enumerable.Range(0, Workers).Select(w => Task.Run(async () =>
            {
                // Stripes are three clusters wide and shifted by half a cluster, so every worker's
                // requests share their edge clusters with its neighbours' (copy-on-write races).
                var rng = new Random(w * 7919 + clusterSize);
                for (var op = 0; op < 300; op++)
                {
                    var s = rng.Next((stripes - 1) / Workers) * Workers + w;
                    var start = (long)s * stripe + clusterSize / 2;
                    var off = start + rng.Next(stripe / 2);
                    var len = rng.Next(1, (int)(start + stripe - off));
                    if (off + len > start + stripe || start + stripe > Size)
                    {
                        throw new InvalidOperationException("stripe arithmetic");
                    }
                    if (rng.Next(4) == 0)
                    {
                        await node.WriteZeroesAsync(off, len, WriteFlags.MayUnmap);
                        lock (model)
                        {
                            Array.Clear(model, (int)off, len);
                        }
                    }
                    else
                    {
                        var data = new byte[len];
                        rng.NextBytes(data);
                        await node.WriteAsync(off, data);
                        lock (model)
                        {
                            data.CopyTo(model, off);
                        }
                    }
                    var check = new byte[len];
                    await node.ReadAsync(off, check);
                    byte[] expected;
                    lock (model)
                    {
                        expected = model.AsSpan((int)off, len).ToArray();
                    }
                    check.Should().Equal(expected, $"worker {w} reads back its own range {off}+{len}");
                }
            })).ToArray();
            await Task.WhenAll(tasks);
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(model);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(top);
        var modelPath = _dir.File("model.raw");
        await File.WriteAllBytesAsync(modelPath, model);
        QemuTools.Img("compare", "-f", "qcow2", "-F", "raw", top, modelPath);
    }
}
