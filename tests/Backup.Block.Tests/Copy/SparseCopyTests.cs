using System.Diagnostics;
using Backup.Block.Copy;
using Backup.Block.Tests.Qcow2;

namespace Backup.Block.Tests.Copy;

/// <summary>
/// The block-status step of block copy: one status call tells a whole run of a thin qcow2 (however
/// large), and a zero run is claimed and done at once without reading the source or writing a fresh target.
/// </summary>
public class SparseCopyTests
{
    private const long MiB = 1 << 20;
    private const long TiB = 1L << 40;

    [Fact]
    public async Task One_probe_tells_a_whole_run_of_a_1_TiB_thin_qcow2()
    {
        using var dir = new TempDir();
        var image = dir.File("thin.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", image, "1T");
        QemuTools.Io(image, "write -P 0x5a 8M 1M", "write -z 600G 64k");
        var (graph, node) = await Qcow2Open.OpenAsync(image);
        try
        {
            using var copy = new BlockCopy(node, new ArrayNode((int)MiB, "t"));
            var clock = Stopwatch.StartNew();
            (await copy.ProbeAsync(0, TiB)).Should().Be(new SourceRun(0, 8 * MiB, IsZero: true));
            (await copy.ProbeAsync(8 * MiB, TiB)).Should().Be(new SourceRun(8 * MiB, 9 * MiB, IsZero: false));
            // One call per extent: unallocated up to the zero cluster (allocated: a run of its own), then the rest.
            const long at = 600L << 30;
            (await copy.ProbeAsync(9 * MiB, TiB)).Should().Be(new SourceRun(9 * MiB, at, IsZero: true));
            (await copy.ProbeAsync(at, TiB)).Should().Be(new SourceRun(at, at + 65536, IsZero: true));
            (await copy.ProbeAsync(at + 65536, TiB)).Should().Be(new SourceRun(at + 65536, TiB, IsZero: true));
            clock.Elapsed.Should().BeLessThan(TimeSpan.FromSeconds(2), "2048 empty L1 entries are not 16 Mi L2 entries");
        }
        finally
        {
            await graph.CloseAllAsync();
        }
    }

    [Fact]
    public async Task A_probe_shorter_than_a_cluster_falls_back_to_one_data_cluster()
    {
        var src = new ArrayNode((int)MiB, "src");
        src.Fill(65536 + 100, 10, 0x11);
        using var copy = new BlockCopy(src, new ArrayNode((int)MiB, "t"));
        var shortRun = new ShortStatusNode(src);
        using var copy2 = new BlockCopy(shortRun, new ArrayNode((int)MiB, "t2"));
        (await copy2.ProbeAsync(0, MiB)).Should().Be(new SourceRun(0, 65536, IsZero: false), "4 KiB of zeros is less than a cluster");
        (await copy.ProbeAsync(131072, MiB)).Should().Be(new SourceRun(131072, MiB, IsZero: true));
    }

    [Fact]
    public async Task A_zero_run_is_claimed_at_once_and_costs_a_fresh_target_nothing()
    {
        var src = new ArrayNode((int)(16 * MiB), "src");
        var fresh = new ArrayNode((int)(16 * MiB), "fresh");
        using var copy = new BlockCopy(src, fresh);
        (await copy.CopyZeroesAsync(0, 16 * MiB)).Should().Be(16 * MiB);
        copy.DirtyBytes.Should().Be(0);
        fresh.Writes.Should().Be(0);
        fresh.ZeroWrites.Should().Be(0);

        var backed = new ArrayNode((int)(16 * MiB), "backed", backing: true);
        backed.Fill(3 * MiB, 100, 0x77);
        using var copy2 = new BlockCopy(src, backed);
        (await copy2.CopyZeroesAsync(MiB, 16 * MiB)).Should().Be(15 * MiB);
        backed.ZeroWrites.Should().Be(1, "one write-zeroes for the whole run where the target has a backing node");
        backed.Snapshot().AsSpan(3 * (int)MiB, 100).ToArray().Should().OnlyContain(b => b == 0);
        copy2.DirtyBytes.Should().Be(MiB, "only the run was copied");
    }

    /// <summary>Reports 4 KiB zero extents only (as a file with small holes would).</summary>
    private sealed class ShortStatusNode(ArrayNode inner) : BlockNode(new NodeContext { NodeName = "short", Graph = BlockGraph.CreateDefault(), Options = [] })
    {
        public override string DriverName => "raw";

        public override long Length => inner.Length;

        public override string Filename => "short";

        protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) =>
            inner.ReadAsync(offset, buffer, cancellationToken);

        protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken) =>
            ValueTask.CompletedTask;

        protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken) =>
            ValueTask.CompletedTask;

        protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) => ValueTask.CompletedTask;

        protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

        protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
            ValueTask.FromResult(new BlockStatus(Math.Min(length, 4096), BlockStatusFlags.Zero));

        public override ImageInfo GetImageInfo() => new() { Filename = Filename, Format = DriverName, VirtualSize = Length };

        public override ValueTask CloseAsync() => ValueTask.CompletedTask;
    }
}
