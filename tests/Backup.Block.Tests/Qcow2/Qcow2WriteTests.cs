using Backup.Block.Drivers.Qcow2;

namespace Backup.Block.Tests.Qcow2;

/// <summary>
/// Random write workloads through the node, checked against an in-memory model of the disk, then with
/// qemu-img check (must be clean after a normal close) and qemu-img compare.
/// </summary>
public sealed class Qcow2WriteTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private string CreateChain(int clusterSize, string compat, int refcountBits, bool withBacking, long size)
    {
        var top = _dir.File("top.qcow2");
        var opts = $"cluster_size={clusterSize},compat={compat},refcount_bits={refcountBits}";
        if (withBacking)
        {
            var baseImg = _dir.File("base.qcow2");
            QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize},compat={compat}", baseImg, (size - size / 8).ToString());
            QemuTools.Io(baseImg, $"write -P 0x5a 0 {size / 2}", $"write -P 0x6b {size / 2 + 1234} {size / 8}");
            QemuTools.Img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2", top, size.ToString());
        }
        else
        {
            QemuTools.Img("create", "-q", "-f", "qcow2", "-o", opts, top, size.ToString());
        }
        QemuTools.Io(top, $"write -P 0x77 {size / 3} {3 * clusterSize}");
        return top;
    }

    public static TheoryData<int, string, int, bool> Workloads() => new()
    {
        { 65536, "1.1", 16, true },
        { 65536, "1.1", 16, false },
        { 65536, "0.10", 16, true },
        { 65536, "0.10", 16, false },
        { 4096, "1.1", 16, true },
        { 512, "1.1", 16, true },
        { 2 << 20, "1.1", 16, true },
        { 512, "1.1", 1, false },
        { 512, "1.1", 2, true },
        { 4096, "1.1", 4, true },
        { 4096, "1.1", 8, false },
        { 4096, "1.1", 32, true },
        { 512, "1.1", 64, true },
    };

    [Theory]
    [MemberData(nameof(Workloads))]
    public async Task Random_workload_matches_model_and_checks_clean(int clusterSize, string compat, int refcountBits, bool withBacking)
    {
        var size = clusterSize switch { 512 => 2L << 20, 2 << 20 => 32L << 20, _ => 16L << 20 };
        var top = CreateChain(clusterSize, compat, refcountBits, withBacking, size);
        var model = QemuTools.ConvertToRaw(top, _dir.Path);
        var rng = new Random(clusterSize * 31 + refcountBits * 7 + (withBacking ? 1 : 0) + compat.Length);

        var (graph, node) = await Qcow2Open.OpenAsync(top, discard: "unmap");
        try
        {
            for (var op = 0; op < 300; op++)
            {
                var kind = rng.Next(100);
                var maxLen = Math.Min(3 * clusterSize + 1000, (int)size);
                var len = rng.Next(1, maxLen);
                var off = rng.NextInt64(0, size - len);
                if (rng.Next(4) == 0)
                {
                    // Aligned requests take the whole-cluster paths.
                    off = off / clusterSize * clusterSize;
                    len = Math.Max(clusterSize, len / clusterSize * clusterSize);
                    len = (int)Math.Min(len, size - off);
                }
                if (kind < 50)
                {
                    var data = new byte[len];
                    rng.NextBytes(data);
                    await node.WriteAsync(off, data);
                    data.CopyTo(model, off);
                }
                else if (kind < 70)
                {
                    var flags = rng.Next(2) == 0 ? WriteFlags.MayUnmap : WriteFlags.None;
                    await node.WriteZeroesAsync(off, len, flags);
                    Array.Clear(model, (int)off, len);
                }
                else if (kind < 82)
                {
                    await node.DiscardAsync(off, len);
                    // Discarded data is unspecified: take what the node now says, but only whole clusters may change.
                    var after = new byte[len];
                    await node.ReadAsync(off, after);
                    var firstWhole = (off + clusterSize - 1) / clusterSize * clusterSize;
                    var endWhole = (off + len) / clusterSize * clusterSize;
                    for (var i = 0; i < len; i++)
                    {
                        var at = off + i;
                        if (at < firstWhole || at >= endWhole)
                        {
                            after[i].Should().Be(model[at], "bytes outside whole discarded clusters must not change");
                        }
                    }
                    after.CopyTo(model, off);
                }
                else if (kind < 97)
                {
                    var buf = new byte[len];
                    await node.ReadAsync(off, buf);
                    buf.Should().Equal(model.AsSpan((int)off, len).ToArray(), $"read at {off}+{len} after op {op}");
                }
                else
                {
                    await node.FlushAsync();
                }
            }
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(model);
        }
        finally
        {
            await graph.CloseAllAsync();
        }

        QemuTools.CheckClean(top);
        var raw = _dir.File("model.raw");
        await File.WriteAllBytesAsync(raw, model);
        QemuTools.Img("compare", "-f", "qcow2", "-F", "raw", top, raw);
    }

    [Theory]
    [InlineData(65536)]
    [InlineData(4096)]
    [InlineData(512)]
    public async Task Concurrent_writes_into_the_same_new_clusters_lose_nothing(int clusterSize)
    {
        var size = 8L << 20;
        var top = CreateChain(clusterSize, "1.1", 16, withBacking: true, size);
        var model = QemuTools.ConvertToRaw(top, _dir.Path);
        const int Writers = 8;
        var slice = clusterSize / Writers;
        var (graph, node) = await Qcow2Open.OpenAsync(top);
        try
        {
            // Every writer writes its own slice of every cluster in the range, all at once: each cluster
            // is allocated by whichever writer comes first and must keep the others' data.
            var clusters = (int)Math.Min(256, size / clusterSize);
            var tasks = Enumerable.Range(0, Writers).Select(w => Task.Run(async () =>
            {
                var rng = new Random(w);
                var order = Enumerable.Range(0, clusters).OrderBy(_ => rng.Next()).ToArray();
                foreach (var c in order)
                {
                    var data = new byte[slice];
                    Array.Fill(data, (byte)(w * 16 + (c & 15)));
                    var off = (long)c * clusterSize + w * slice;
                    await node.WriteAsync(off, data);
                }
            })).ToArray();
            // Readers run alongside, exercising the lock-free path against allocation.
            var readers = Enumerable.Range(0, 2).Select(r => Task.Run(async () =>
            {
                var buf = new byte[clusterSize * 3];
                for (var i = 0; i < 200; i++)
                {
                    await node.ReadAsync(i * 997L % (size - buf.Length), buf);
                }
            })).ToArray();
            await Task.WhenAll(tasks.Concat(readers));
            for (var c = 0; c < clusters; c++)
            {
                for (var w = 0; w < Writers; w++)
                {
                    Array.Fill(model, (byte)(w * 16 + (c & 15)), c * clusterSize + w * slice, slice);
                }
            }
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(model);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(top);
    }

    /// <summary>
    /// A clock that moves on by <see cref="Step"/> each time it is read: zero makes every reserve refill
    /// part of a write storm (the batch doubles), a long step makes every refill the first of its storm.
    /// </summary>
    private sealed class SteppingClock : TimeProvider
    {
        private long _now;

        public TimeSpan Step { get; set; }

        public override long TimestampFrequency => TimeSpan.TicksPerSecond;

        public override long GetTimestamp() => Interlocked.Add(ref _now, Step.Ticks) - Step.Ticks;
    }

    [Theory]
    [InlineData(false, false)]
    [InlineData(false, true)]
    [InlineData(true, false)]
    [InlineData(true, true)]
    public async Task Mass_discard_frees_clusters_for_reuse_without_a_guest_flush(bool firstWriteIsAStorm, bool rewriteIsAStorm)
    {
        // 8192 freed 512-byte clusters exceed the pending-free limit, so they are returned mid-run and
        // the rewrite reuses them: the file must not grow. How fast the reserve refills come (which sets
        // its batch size, 4 or 8 MiB here) must change neither.
        var img = _dir.File("mass.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "8M");
        var model = new byte[8 << 20];
        var (graph, node) = await Qcow2Open.OpenAsync(img, discard: "unmap");
        var clock = new SteppingClock();
        node.Should().BeOfType<Qcow2Node>().Subject.Clock = clock;
        long sizeAfterFirst;
        List<(long Start, long End)> freed;
        try
        {
            var data = new byte[4 << 20];
            new Random(3).NextBytes(data);
            clock.Step = firstWriteIsAStorm ? TimeSpan.Zero : TimeSpan.FromSeconds(2);
            await node.WriteAsync(0, data);
            await node.FlushAsync();
            sizeAfterFirst = new FileInfo(img).Length;
            freed = HostRanges(img, 0, 4 << 20);
            await node.DiscardAsync(0, 4 << 20);
            new Random(4).NextBytes(data);
            clock.Step = rewriteIsAStorm ? TimeSpan.Zero : TimeSpan.FromSeconds(2);
            await node.WriteAsync(2 << 20, data);
            data.CopyTo(model, 2 << 20);
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(model);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        freed.Sum(r => r.End - r.Start).Should().Be(4 << 20);
        var rewritten = HostRanges(img, 2 << 20, 4 << 20);
        var reused = rewritten.Sum(r => freed.Sum(f => Math.Max(0, Math.Min(r.End, f.End) - Math.Max(r.Start, f.Start))));
        // Only the 64 new L2 tables (for 4-6 MiB, 32 KiB each) may take freed clusters away from the data.
        reused.Should().BeGreaterThanOrEqualTo((4 << 20) - 64 * 512, "the rewrite must reuse the discarded clusters");
        new FileInfo(img).Length.Should().BeLessThan(sizeAfterFirst + (3 << 20));
        QemuTools.CheckClean(img);
        var raw = _dir.File("model.raw");
        await File.WriteAllBytesAsync(raw, model);
        QemuTools.Img("compare", "-f", "qcow2", "-F", "raw", img, raw);
    }

    [Fact]
    public async Task A_partial_write_into_a_new_cluster_over_zeros_has_the_file_zero_it_instead_of_copying_on_write()
    {
        // As QEMU (handle_alloc_space): where the rest of a new cluster reads as zeros, the file zeroes
        // the cluster (fallocate) and only the request's bytes are written; no copy-on-write read happens.
        // Every cow_read fails here, so a write that copies on write fails.
        var img = _dir.File("partial.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", img, "8M");
        QemuTools.Io(img, "write -P 0x10 6M 64k");
        QemuTools.Img("snapshot", "-c", "s1", img);
        var model = QemuTools.ConvertToRaw(img, _dir.Path);
        var (graph, node) = await OpenFailingCowReadsAsync();
        try
        {
            await WriteAsync(8192, 4096, 0x55);

            // A freed cluster still holds its old data: taken again, it must read as zeros around the write.
            await WriteAsync(1 << 20, 1 << 20, 0xAA);
            await node.FlushAsync();
            var freed = HostRanges(img, 1 << 20, 1 << 20);
            await node.DiscardAsync(1 << 20, 1 << 20);
            Array.Clear(model, 1 << 20, 1 << 20);
            await node.FlushAsync();
            await WriteAsync((4 << 20) + 4096, 4096, 0x66);
            var reused = HostRanges(img, (4 << 20) + 4096, 4096).Should().ContainSingle().Subject.Start - 4096;
            freed.Should().Contain(r => r.Start <= reused && reused < r.End, "the test needs the write to take a freed cluster");
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(model);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(img);
        var raw = _dir.File("model.raw");
        await File.WriteAllBytesAsync(raw, model);
        QemuTools.Img("compare", "-f", "qcow2", "-F", "raw", img, raw);

        // A cluster shared with the snapshot holds data: a partial write into it copies on write, and fails here.
        (graph, node) = await OpenFailingCowReadsAsync();
        try
        {
            var copy = async () => await node.WriteAsync(6 << 20, new byte[4096]);
            await copy.Should().ThrowAsync<IOException>();
        }
        finally
        {
            await graph.CloseAllAsync();
        }

        async Task<(BlockGraph, BlockNode)> OpenFailingCowReadsAsync()
        {
            var g = BlockGraph.CreateDefault();
            var n = await g.AddAsync(new BlockOptions
            {
                ["driver"] = "qcow2",
                ["node-name"] = "img",
                ["discard"] = "unmap",
                ["file"] = new BlockOptions
                {
                    ["driver"] = "blkdebug",
                    ["inject-error"] = new List<object?> { new BlockOptions { ["event"] = "cow_read" } },
                    ["image"] = new BlockOptions { ["driver"] = "file", ["filename"] = img },
                },
            });
            return (g, n);
        }

        async Task WriteAsync(long offset, int length, byte value)
        {
            var data = new byte[length];
            Array.Fill(data, value);
            await node.WriteAsync(offset, data);
            data.CopyTo(model, offset);
        }
    }

    /// <summary>Host byte ranges (qemu-img map) holding the data of guest bytes [start, start + length).</summary>
    private static List<(long Start, long End)> HostRanges(string img, long start, long length)
    {
        // -U: the image is still open in the node when this is called.
        using var map = System.Text.Json.JsonDocument.Parse(QemuTools.Img("map", "-U", "--output=json", "-f", "qcow2", img));
        var ranges = new List<(long Start, long End)>();
        foreach (var e in map.RootElement.EnumerateArray())
        {
            var guest = e.GetProperty("start").GetInt64();
            var len = e.GetProperty("length").GetInt64();
            var from = Math.Max(guest, start);
            var to = Math.Min(guest + len, start + length);
            if (to > from && e.GetProperty("data").GetBoolean() && e.TryGetProperty("offset", out var host))
            {
                ranges.Add((host.GetInt64() + from - guest, host.GetInt64() + to - guest));
            }
        }
        return ranges;
    }

    [Fact]
    public async Task Refcount_table_grows_when_the_image_outgrows_it()
    {
        // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters and the
        // one-cluster refcount table covers 2 MiB of file, so writing 6 MiB must grow the table.
        var img = _dir.File("grow.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "8M");
        var before = QemuTools.Info(img);
        var model = new byte[8 << 20];
        var (graph, node) = await Qcow2Open.OpenAsync(img);
        try
        {
            var rng = new Random(5);
            for (long off = 0; off < 6 << 20; off += 64 * 1024)
            {
                var data = new byte[64 * 1024];
                rng.NextBytes(data);
                await node.WriteAsync(off, data);
                data.CopyTo(model, off);
            }
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        before.GetProperty("actual-size").GetInt64().Should().BeLessThan(1 << 20);
        var header = new byte[64];
        await using (var f = File.OpenRead(img))
        {
            await f.ReadExactlyAsync(header);
        }
        System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(header.AsSpan(48)).Should().NotBe(512, "the refcount table must have moved");
        QemuTools.CheckClean(img);
        var raw = _dir.File("model.raw");
        await File.WriteAllBytesAsync(raw, model);
        QemuTools.Img("compare", "-f", "qcow2", "-F", "raw", img, raw);
    }

    [Fact]
    public async Task Writes_copy_clusters_shared_with_an_internal_snapshot()
    {
        var img = _dir.File("snap.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", img, "4M");
        QemuTools.Io(img, "write -P 0x10 0 4M");
        QemuTools.Img("snapshot", "-c", "s1", img);
        var original = QemuTools.ConvertToRaw(img, _dir.Path);
        var model = (byte[])original.Clone();
        var (graph, node) = await Qcow2Open.OpenAsync(img, discard: "unmap");
        try
        {
            var data = new byte[70000];
            Array.Fill(data, (byte)0x99);
            await node.WriteAsync(1000, data);
            data.CopyTo(model, 1000);
            await node.DiscardAsync(1 << 20, 1 << 20);
            Array.Clear(model, 1 << 20, 1 << 20);
            await node.WriteZeroesAsync(3 << 20, 65536);
            Array.Clear(model, 3 << 20, 65536);
            (await Qcow2Open.ReadAllAsync(node)).Should().Equal(model);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckClean(img);
        var snapRaw = _dir.File("s1.raw");
        QemuTools.Img("convert", "-l", "snapshot.name=s1", "-O", "raw", img, snapRaw);
        (await File.ReadAllBytesAsync(snapRaw)).Should().Equal(original);
        var raw = _dir.File("model.raw");
        await File.WriteAllBytesAsync(raw, model);
        QemuTools.Img("compare", "-f", "qcow2", "-F", "raw", img, raw);
    }
}
