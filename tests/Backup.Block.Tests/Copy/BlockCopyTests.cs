using Backup.Block.Copy;
using Backup.Block.Drivers.CopyBeforeWrite;

namespace Backup.Block.Tests.Copy;

/// <summary>A node over a byte array whose writes can be held at a gate or made to fail (a slow or broken target).</summary>
internal sealed class ArrayNode : BlockNode
{
    private readonly byte[] _data;

    public ArrayNode(int length, string name, int? clusterSize = null, bool backing = false)
        : base(new NodeContext { NodeName = name, Graph = BlockGraph.CreateDefault(), Options = [] })
    {
        _data = new byte[length];
        ClusterSize = clusterSize;
        Children = backing ? [new BlockChild("backing", this)] : [];
    }

    public int? ClusterSize { get; }

    public int Writes;

    public int ZeroWrites;

    /// <summary>While set, writes wait for it.</summary>
    public TaskCompletionSource? Gate { get; set; }

    /// <summary>errno of the next writes (0: none).</summary>
    public int FailWrites { get; set; }

    public override IReadOnlyList<BlockChild> Children { get; }

    public override string DriverName => "raw";

    public override long Length => _data.Length;

    public override string Filename => NodeName;

    public byte[] Snapshot()
    {
        lock (_data)
        {
            return (byte[])_data.Clone();
        }
    }

    public void Fill(long offset, int length, byte value)
    {
        lock (_data)
        {
            _data.AsSpan((int)offset, length).Fill(value);
        }
    }

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        lock (_data)
        {
            _data.AsSpan((int)offset, buffer.Length).CopyTo(buffer.Span);
        }
        return ValueTask.CompletedTask;
    }

    protected override async ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        await PassAsync();
        Interlocked.Increment(ref Writes);
        lock (_data)
        {
            data.Span.CopyTo(_data.AsSpan((int)offset));
        }
    }

    protected override async ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        await PassAsync();
        Interlocked.Increment(ref ZeroWrites);
        Fill(offset, (int)length, 0);
    }

    private async ValueTask PassAsync()
    {
        if (Gate is { } gate)
        {
            await gate.Task;
        }
        if (FailWrites != 0)
        {
            throw Posix.LibC.ErrnoException(FailWrites);
        }
    }

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        lock (_data)
        {
            var zero = _data.AsSpan((int)offset, (int)length).IndexOfAnyExcept((byte)0) < 0;
            return ValueTask.FromResult(new BlockStatus(length, zero ? BlockStatusFlags.Zero : BlockStatusFlags.Data | BlockStatusFlags.Allocated));
        }
    }

    public override ImageInfo GetImageInfo() => new() { Filename = Filename, Format = DriverName, VirtualSize = Length, ClusterSize = ClusterSize };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}

public class BlockCopyTests
{
    private const int MiB = 1 << 20;

    private static CopyBeforeWriteNode Filter(ArrayNode file, ArrayNode target, OnCbwError onError = OnCbwError.BreakGuestWrite,
        TimeSpan timeout = default, BlockCopyOptions? options = null) =>
        new(new NodeContext { NodeName = "cbw", Graph = BlockGraph.CreateDefault(), Options = [] },
            file, target, new BlockCopy(file, target, options), onError, timeout);

    private static async Task WriteAsync(BlockNode node, long offset, int length, byte value)
    {
        var data = new byte[length];
        Array.Fill(data, value);
        await node.WriteAsync(offset, data);
    }

    [Theory]
    [InlineData(0UL, null)]
    [InlineData(65536UL, null)]
    [InlineData(1UL << 62, null)]
    [InlineData(100_000UL, "min-cluster-size needs to be a power of 2")]
    [InlineData(1UL << 63, "min-cluster-size too large: 9223372036854775808 > 9223372036854775807")]
    public void Min_cluster_size_is_checked_as_QEMU_checks_it(ulong value, string? error)
    {
        var check = FluentActions.Invoking(() => BlockCopy.CheckMinClusterSize(value));
        if (error is null)
        {
            check.Should().NotThrow();
        }
        else
        {
            check.Should().Throw<BlockException>().WithMessage(error);
        }
    }

    [Fact]
    public void The_cluster_is_the_largest_of_64_KiB_the_target_cluster_and_min_cluster_size()
    {
        BlockCopy.ClusterSizeFor(new ArrayNode(MiB, "t")).Should().Be(65536);
        BlockCopy.ClusterSizeFor(new ArrayNode(MiB, "t", clusterSize: 4096)).Should().Be(65536);
        BlockCopy.ClusterSizeFor(new ArrayNode(4 * MiB, "t", clusterSize: 2 * MiB)).Should().Be(2 * MiB);
        BlockCopy.ClusterSizeFor(new ArrayNode(MiB, "t"), minClusterSize: 256 * 1024).Should().Be(256 * 1024);
    }

    [Fact]
    public async Task A_guest_write_saves_the_old_clusters_once_and_only_them()
    {
        var src = new ArrayNode(MiB, "src");
        src.Fill(0, MiB, 0x11);
        var tgt = new ArrayNode(MiB, "tgt");
        var f = Filter(src, tgt);
        f.BlockCopy.DirtyBytes.Should().Be(MiB);
        await WriteAsync(f, 65536 + 100, 10, 0x22);
        await WriteAsync(src, 65536 + 200, 10, 0x23); // straight to the file child: still copied before
        tgt.Snapshot().AsSpan(65536, 65536).ToArray().Should().OnlyContain(b => b == 0x11);
        tgt.Snapshot().AsSpan(0, 65536).ToArray().Should().OnlyContain(b => b == 0);
        tgt.Snapshot().AsSpan(131072).ToArray().Should().OnlyContain(b => b == 0);
        tgt.Writes.Should().Be(1, "the cluster is copied once");
        f.BlockCopy.DirtyBytes.Should().Be(MiB - 65536);
        f.DoneBitmap.DirtyByteCount.Should().Be(65536);
        f.AccessBitmap.DirtyByteCount.Should().Be(MiB);
        src.Snapshot()[65536 + 100].Should().Be(0x22);
    }

    [Fact]
    public async Task Zero_clusters_become_write_zeroes_skipped_where_a_target_without_backing_reads_zeros()
    {
        var src = new ArrayNode(MiB, "src");
        var tgt = new ArrayNode(MiB, "tgt");
        var f = Filter(src, tgt);
        await WriteAsync(f, 0, 200_000, 0x33);
        tgt.Writes.Should().Be(0);
        tgt.ZeroWrites.Should().Be(0, "the target already reads as zeros there");
        f.BlockCopy.DirtyBytes.Should().Be(MiB - 4 * 65536);

        var src2 = new ArrayNode(MiB, "src2");
        var backed = new ArrayNode(MiB, "tgt2", backing: true);
        var f2 = Filter(src2, backed);
        await WriteAsync(f2, 0, 100, 0x33);
        backed.ZeroWrites.Should().Be(1, "a target with a backing node needs zero clusters");
    }

    [Fact]
    public async Task A_failed_copy_fails_the_guest_write_and_leaves_its_clusters_to_copy()
    {
        var src = new ArrayNode(MiB, "src");
        src.Fill(0, MiB, 0x11);
        var tgt = new ArrayNode(MiB, "tgt") { FailWrites = 5 };
        var f = Filter(src, tgt);
        var write = async () => await WriteAsync(f, 0, 4096, 0x22);
        (await write.Should().ThrowAsync<IOException>()).Which.Message.Should().Be("Input/output error");
        src.Snapshot()[0].Should().Be(0x11, "the guest write did not happen");
        f.BlockCopy.DirtyBytes.Should().Be(MiB);
        f.DoneBitmap.DirtyByteCount.Should().Be(0);
        tgt.FailWrites = 0;
        await WriteAsync(f, 0, 4096, 0x22);
        tgt.Snapshot().AsSpan(0, 65536).ToArray().Should().OnlyContain(b => b == 0x11);
        f.IsSnapshotBroken.Should().BeFalse();
    }

    [Fact]
    public async Task Break_snapshot_lets_the_guest_write_go_on_and_copies_nothing_more()
    {
        var src = new ArrayNode(MiB, "src");
        src.Fill(0, MiB, 0x11);
        var tgt = new ArrayNode(MiB, "tgt") { FailWrites = 5 };
        var f = Filter(src, tgt, OnCbwError.BreakSnapshot);
        await WriteAsync(f, 0, 4096, 0x22);
        f.IsSnapshotBroken.Should().BeTrue();
        tgt.FailWrites = 0;
        await WriteAsync(f, 131072, 4096, 0x33);
        tgt.Writes.Should().Be(0);
        src.Snapshot()[0].Should().Be(0x22);
        src.Snapshot()[131072].Should().Be(0x33);
    }

    [Theory]
    [InlineData(OnCbwError.BreakGuestWrite)]
    [InlineData(OnCbwError.BreakSnapshot)]
    public async Task A_copy_slower_than_cbw_timeout_gives_up_the_wait_but_ends_in_the_background(OnCbwError mode)
    {
        var src = new ArrayNode(MiB, "src");
        src.Fill(0, MiB, 0x11);
        var tgt = new ArrayNode(MiB, "tgt") { Gate = new TaskCompletionSource() };
        var f = Filter(src, tgt, mode, TimeSpan.FromMilliseconds(200));
        var write = WriteAsync(f, 0, 4096, 0x22);
        var finished = await Task.WhenAny(write, Task.Delay(10_000));
        finished.Should().BeSameAs(write, "the guest write waits at most cbw-timeout");
        if (mode == OnCbwError.BreakGuestWrite)
        {
            (await write.Invoking(w => w).Should().ThrowAsync<IOException>()).Which.Message.Should().Be("Connection timed out");
            src.Snapshot()[0].Should().Be(0x11);
        }
        else
        {
            await write;
            f.IsSnapshotBroken.Should().BeTrue();
            src.Snapshot()[0].Should().Be(0x22);
        }
        // The copy itself goes on: once the target lets it through, its cluster is copied and a close waits for it.
        tgt.Gate.SetResult();
        await f.CloseAsync();
        tgt.Snapshot().AsSpan(0, 65536).ToArray().Should().OnlyContain(b => b == 0x11);
        src.WriteObservers.Should().NotContain(o => o.GetType().DeclaringType == typeof(CopyBeforeWriteNode));
        src.GetDirtyBitmapsOrEmpty().Should().BeEmpty("the copy bitmap went with the filter");
    }

    [Fact]
    public async Task A_bitmap_limits_what_is_copied_and_claims_are_at_most_one_chunk()
    {
        var src = new ArrayNode(8 * MiB, "src");
        src.Fill(0, 8 * MiB, 0x11);
        var tgt = new ArrayNode(8 * MiB, "tgt");
        var bits = new Block.Bitmaps.HBitmap(8 * MiB, 12);
        bits.Set(4096, 1);
        bits.Set(3 * MiB, 2 * MiB);
        var f = new CopyBeforeWriteNode(new NodeContext { NodeName = "cbw", Graph = BlockGraph.CreateDefault(), Options = [] },
            src, tgt, new BlockCopy(src, tgt, new BlockCopyOptions { MaxChunk = 65536 * 2 }, bits));
        f.BlockCopy.DirtyBytes.Should().Be(65536 + 2 * MiB);
        f.BlockCopy.MaxChunk.Should().Be(131072);
        await f.WriteZeroesAsync(0, 8 * MiB);
        tgt.Writes.Should().Be(1 + 2 * MiB / 131072, "one write per claim of at most max-chunk");
        tgt.Snapshot().AsSpan(65536, 3 * MiB - 65536).ToArray().Should().OnlyContain(b => b == 0);
        tgt.Snapshot().AsSpan(3 * MiB, 2 * MiB).ToArray().Should().OnlyContain(b => b == 0x11);
        f.BlockCopy.DirtyBytes.Should().Be(0);
    }

    [Fact]
    public async Task Inactive_until_activated_and_stopped_for_good()
    {
        var src = new ArrayNode(MiB, "src");
        src.Fill(0, MiB, 0x11);
        var tgt = new ArrayNode(MiB, "tgt");
        var copy = new BlockCopy(src, tgt, new BlockCopyOptions { StartInactive = true });
        var f = new CopyBeforeWriteNode(new NodeContext { NodeName = "cbw", Graph = BlockGraph.CreateDefault(), Options = [] }, src, tgt, copy);
        await WriteAsync(f, 0, 10, 0x22);
        tgt.Writes.Should().Be(0);
        copy.Activate();
        await WriteAsync(f, 65536, 10, 0x22);
        tgt.Writes.Should().Be(1);
        (await copy.CopyAsync(0, MiB)).Should().Be(MiB - 65536, "the background copy takes what is left");
        copy.IsIdle(out _).Should().BeTrue();
        tgt.Snapshot()[0].Should().Be(0x22, "the write before activation is before the point in time");
        await copy.StopGuestCopiesAsync();
        copy.Activate();
        copy.PutBack(0, 65536);
        var writes = tgt.Writes;
        await WriteAsync(f, 0, 10, 0x23);
        tgt.Writes.Should().Be(writes, "stopped copies stay stopped");
        f.Detach();
    }

    /// <summary>Holds every write to its node at <see cref="Gate"/> before the observers after it run.</summary>
    private sealed class HoldingObserver : IWriteObserver
    {
        public TaskCompletionSource Entered { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public TaskCompletionSource Gate { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public async ValueTask BeforeWriteAsync(BlockNode node, long offset, long length, WriteKind kind, CancellationToken cancellationToken)
        {
            Entered.TrySetResult();
            await Gate.Task;
        }

        public void AfterWrite(BlockNode node, long offset, long length, WriteKind kind)
        {
        }
    }

    [Fact]
    public async Task A_quiesce_that_starts_while_a_guest_write_is_in_flight_lets_its_copy_read_the_source()
    {
        // A transaction quiesces the source while a guest write is inside: the write's copy-before-write
        // must still read the source, or the quiesce waits for the write and the write for its copy (QEMU:
        // a drained section holds new requests from devices, not the reads the requests inside make).
        var src = PatternedSource();
        var tgt = new ArrayNode(MiB, "tgt");
        var hold = new HoldingObserver();
        src.AddWriteObserver(hold);
        var f = Filter(src, tgt);
        var write = WriteAsync(src, 65536, 4096, 0xEE);
        await hold.Entered.Task.WaitAsync(TimeSpan.FromSeconds(10));
        var quiesce = src.QuiesceAsync().AsTask();
        src.IsQuiesced.Should().BeTrue();
        hold.Gate.SetResult();
        await write.WaitAsync(TimeSpan.FromSeconds(10));
        using (await quiesce.WaitAsync(TimeSpan.FromSeconds(10)))
        {
            tgt.Snapshot()[65536].Should().Be(17, "the old data was saved");
        }
        f.Detach();
    }

    /// <summary>A source whose every 4 KiB block holds its own byte, so a block copied to the wrong place shows.</summary>
    private static ArrayNode PatternedSource()
    {
        var src = new ArrayNode(MiB, "src");
        for (var block = 0; block < MiB / 4096; block++)
        {
            src.Fill(block * 4096L, 4096, (byte)(block % 250 + 1));
        }
        return src;
    }

    [Fact]
    public async Task A_guest_copy_at_write_size_saves_only_the_blocks_written_and_the_owner_copies_the_rest()
    {
        var src = PatternedSource();
        var atStart = src.Snapshot();
        var tgt = new ArrayNode(MiB, "tgt");
        var f = Filter(src, tgt, options: new BlockCopyOptions { GuestCopiesAtWriteSize = true });
        f.BlockCopy.GuestCopyGrain.Should().Be(4096);
        f.BlockCopy.ClusterSize.Should().Be(65536, "the owner's copies still go by clusters");

        await WriteAsync(f, 65536 + 8192 + 100, 10, 0xEE);

        f.BlockCopy.DirtyBytes.Should().Be(MiB - 4096, "only the 4 KiB block under the write was copied");
        f.DoneBitmap.DirtyByteCount.Should().Be(4096);
        // query-block lists the copy bitmap as QEMU's: by clusters, dirty while any block of one is.
        var listed = src.GetDirtyBitmapsOrEmpty().Should().ContainSingle().Subject;
        listed.Granularity.Should().Be(65536);
        listed.Bits.DirtyByteCount.Should().Be(MiB);
        await WriteAsync(f, 131072, 65536, 0xED);
        listed.Bits.DirtyByteCount.Should().Be(MiB - 65536, "a write over a whole cluster saves all of it");
        tgt.Snapshot().AsSpan(65536 + 8192, 4096).ToArray().Should().Equal(atStart.AsSpan(65536 + 8192, 4096).ToArray());
        tgt.Snapshot().AsSpan(65536, 8192).ToArray().Should().OnlyContain(b => b == 0, "the rest of the cluster is still to copy");
        // A snapshot reader takes the saved block from the target and the rest of the cluster from the source.
        var view = new byte[65536];
        await f.SnapshotReadAsync(65536, view, CancellationToken.None);
        view.Should().Equal(atStart.AsSpan(65536, 65536).ToArray());

        await f.BlockCopy.CopyAsync(0, MiB);

        tgt.Snapshot().Should().Equal(atStart, "the owner copied everything but the saved blocks, which it must not copy again");
        f.BlockCopy.DirtyBytes.Should().Be(0);
        listed.Bits.DirtyByteCount.Should().Be(0);
        var writes = tgt.Writes;
        await WriteAsync(f, 65536 + 100, 10, 0xEF);
        tgt.Writes.Should().Be(writes, "nothing is left to copy before a write");
    }

    [Fact]
    public void A_bitmap_still_selects_whole_clusters_with_guest_copies_at_write_size()
    {
        // An incremental target without backing may be rebased onto the previous backup: each cluster it
        // holds must hold all of the cluster's data, as QEMU copies it, not only the 4 KiB the bitmap marked.
        var bitmap = new Block.Bitmaps.HBitmap(MiB, 12);
        bitmap.Set(65536 + 8192, 4096);
        using var copy = new BlockCopy(new ArrayNode(MiB, "src"), new ArrayNode(MiB, "tgt"),
            new BlockCopyOptions { GuestCopiesAtWriteSize = true }, bitmap);
        copy.GuestCopyGrain.Should().Be(4096);
        copy.DirtyBytes.Should().Be(65536);
        copy.NextDirtyExtent(0, MiB).Should().Be(new Block.Bitmaps.BitmapExtent(65536, 65536));
    }

    [Fact]
    public void Guest_copies_stay_whole_clusters_where_the_target_could_show_something_else()
    {
        var options = new BlockCopyOptions { GuestCopiesAtWriteSize = true };
        Filter(new ArrayNode(MiB, "src"), new ArrayNode(MiB, "tgt", backing: true), options: options)
            .BlockCopy.GuestCopyGrain.Should().Be(65536, "a backing node shows through what a partly saved cluster has not written");
        Filter(new ArrayNode(MiB, "src"), new ArrayNode(MiB, "tgt"), options: options with { Compress = true })
            .BlockCopy.GuestCopyGrain.Should().Be(65536, "compressed clusters are written whole");
        Filter(new ArrayNode(MiB, "src"), new ArrayNode(MiB, "tgt"))
            .BlockCopy.GuestCopyGrain.Should().Be(65536, "QEMU's unit is the default");
        Filter(new ArrayNode(4 * MiB, "src"), new ArrayNode(4 * MiB, "tgt", clusterSize: 2 * MiB), options: options)
            .BlockCopy.GuestCopyGrain.Should().Be(128 * 1024, "a sixteenth of a 2 MiB cluster");
    }
}

internal static class BitmapTestExtensions
{
    public static IReadOnlyList<Block.Bitmaps.DirtyBitmap> GetDirtyBitmapsOrEmpty(this BlockNode node) =>
        Block.Bitmaps.BlockNodeBitmapExtensions.TryGetDirtyBitmaps(node)?.Bitmaps ?? [];
}
