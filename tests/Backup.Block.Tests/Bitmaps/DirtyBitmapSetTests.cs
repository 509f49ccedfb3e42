using Backup.Block.Bitmaps;

namespace Backup.Block.Tests.Bitmaps;

public sealed class DirtyBitmapSetTests
{
    private const long MiB = 1024 * 1024;

    private static (MemoryNode Node, DirtyBitmapSet Set) NewNode(long size = 64 * MiB, DiscardMode discard = DiscardMode.Ignore)
    {
        var node = new MemoryNode(size, discard: discard);
        return (node, node.GetDirtyBitmaps());
    }

    // ------------------------------------------------------------------ add / validation

    [Fact]
    public void Add_validates_in_qsd_order_with_qsd_texts()
    {
        var (_, set) = NewNode();
        set.Invoking(s => s.Add("")).Should().Throw<BlockException>().WithMessage("Bitmap name cannot be empty");
        set.Invoking(s => s.Add("b0", 1000)).Should().Throw<BlockException>()
            .WithMessage("Granularity must be power of 2 and at least 512");
        set.Invoking(s => s.Add("b0", 256)).Should().Throw<BlockException>()
            .WithMessage("Granularity must be power of 2 and at least 512");
        set.Invoking(s => s.Add("b0", 1L << 32)).Should().Throw<BlockException>()
            .WithMessage("Granularity must be power of 2 and at least 512");
        set.Add("b0", 1L << 31).Granularity.Should().Be(1L << 31);
        set.Invoking(s => s.Add("b0")).Should().Throw<BlockException>().WithMessage("Bitmap already exists: b0");
        // The granularity is checked before the name is looked up.
        set.Invoking(s => s.Add("b0", 3)).Should().Throw<BlockException>()
            .WithMessage("Granularity must be power of 2 and at least 512");
        var longName = new string('x', 1024);
        set.Invoking(s => s.Add(longName)).Should().Throw<BlockException>().WithMessage("Bitmap name too long: " + longName);
        set.Add(new string('x', 1023)).Name.Should().HaveLength(1023);
        // 1023 bytes, counted in UTF-8: 512 two-byte characters are too long.
        set.Invoking(s => s.Add(new string('é', 512))).Should().Throw<BlockException>().WithMessage("Bitmap name too long: *");
    }

    [Theory]
    [InlineData("qcow2", 512, 4096)]
    [InlineData("qcow2", 4096, 4096)]
    [InlineData("qcow2", 16384, 16384)]
    [InlineData("qcow2", 65536, 65536)]
    [InlineData("qcow2", 2 * 1024 * 1024, 65536)]
    [InlineData("raw", null, 65536)]
    [InlineData("file", null, 65536)]
    public void Default_granularity_is_the_cluster_size_clamped_or_64KiB(string format, int? cluster, long expected)
    {
        var node = new MemoryNode(MiB, clusterSize: cluster, format: format);
        DirtyBitmapSet.DefaultGranularity(node).Should().Be(expected);
        node.GetDirtyBitmaps().Add("b0").Granularity.Should().Be(expected);
    }

    [Fact]
    public void Query_lists_newest_first_with_bytes_count()
    {
        var (_, set) = NewNode();
        set.Query().Should().BeEmpty();
        set.Add("b0");
        set.Add("b1", 512, persistent: true, disabled: true);
        set.Query().Should().Equal(
            new DirtyBitmapInfo("b1", Recording: false, Persistent: true, Busy: false, 512, 0, false),
            new DirtyBitmapInfo("b0", Recording: true, Persistent: false, Busy: false, 65536, 0, false));
    }

    [Fact]
    public async Task Count_is_not_clipped_to_the_disk_size()
    {
        var (node, set) = NewNode();
        var b = set.Add("b0", 1L << 31);
        await node.WriteAsync(0, new byte[512]);
        b.Count.Should().Be(2147483648L);
    }

    [Fact]
    public void Empty_bitmap_sha256_matches_qsd()
    {
        var (_, set) = NewNode();
        set.Add("b0").Sha256().Should().Be("38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca");
    }

    [Fact]
    public void Get_and_remove_unknown_bitmap()
    {
        var (_, set) = NewNode();
        set.Invoking(s => s.Get("x")).Should().Throw<BlockException>().WithMessage("Dirty bitmap 'x' not found");
        set.Invoking(s => s.Remove("x")).Should().Throw<BlockException>().WithMessage("Dirty bitmap 'x' not found");
    }

    [Fact]
    public void Node_without_bitmaps_has_no_set_until_asked()
    {
        var node = new MemoryNode(MiB);
        node.TryGetDirtyBitmaps().Should().BeNull();
        node.WriteObservers.Should().BeEmpty();
        node.GetDirtyBitmaps().Add("b0");
        node.TryGetDirtyBitmaps().Should().NotBeNull();
        node.WriteObservers.Should().ContainSingle();
        node.GetDirtyBitmaps().Add("b1");
        node.WriteObservers.Should().ContainSingle("the observer is attached once per node");
    }

    // ------------------------------------------------------------------ guards

    [Fact]
    public void Guards_use_qsd_texts_in_qemu_order()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        b.SetBusy(true);
        b.SetReadOnly(true);
        b.Invoking(x => x.Check(BitmapCheck.Default)).Should().Throw<BlockException>()
            .WithMessage("Bitmap 'b0' is currently in use by another operation and cannot be used");
        b.SetBusy(false);
        b.Invoking(x => x.Check(BitmapCheck.Default)).Should().Throw<BlockException>()
            .WithMessage("Bitmap 'b0' is readonly and cannot be modified");
        b.Invoking(x => x.Check(BitmapCheck.AllowReadOnly)).Should().NotThrow();
        b.SetReadOnly(false);

        var pb = set.Add("pb", persistent: true);
        pb.SetInconsistent();
        pb.Recording.Should().BeFalse();
        pb.GetInfo().Inconsistent.Should().BeTrue();
        pb.Invoking(x => x.Check(BitmapCheck.AllowReadOnly)).Should().Throw<BlockException>()
            .WithMessage("Bitmap 'pb' is inconsistent and cannot be used");
        set.Remove("pb");
        set.Find("pb").Should().BeNull();
    }

    [Fact]
    public void Remove_rejects_busy_and_readonly_bitmaps()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        b.SetBusy(true);
        set.Invoking(s => s.Remove("b0")).Should().Throw<BlockException>()
            .WithMessage("Bitmap 'b0' is currently in use by another operation and cannot be used");
        b.SetBusy(false);
        b.SetReadOnly(true);
        set.Invoking(s => s.Remove("b0")).Should().Throw<BlockException>()
            .WithMessage("Bitmap 'b0' is readonly and cannot be modified");
        b.SetReadOnly(false);
        set.Remove("b0").Should().BeSameAs(b);
        set.IsEmpty.Should().BeTrue();
    }

    // ------------------------------------------------------------------ recording

    [Fact]
    public async Task Writes_and_write_zeroes_dirty_recording_bitmaps_only()
    {
        var (node, set) = NewNode();
        var on = set.Add("on");
        var off = set.Add("off", disabled: true);
        await node.WriteAsync(65536 + 10, new byte[100]);
        await node.WriteZeroesAsync(10 * MiB, 2 * 65536);
        on.Count.Should().Be(3 * 65536);
        off.Count.Should().Be(0);
        on.Bits.Get(65536).Should().BeTrue();
        on.Disable();
        await node.WriteAsync(0, new byte[1]);
        on.Count.Should().Be(3 * 65536);
        off.Enable();
        await node.WriteAsync(0, new byte[1]);
        off.Count.Should().Be(65536);
    }

    [Fact]
    public async Task Discard_dirties_only_when_it_reaches_the_node()
    {
        var (ignoring, s1) = NewNode();
        var b1 = s1.Add("b0");
        await ignoring.DiscardAsync(0, MiB);
        b1.Count.Should().Be(0, "discard=ignore drops the request before it reaches the node");

        var (unmapping, s2) = NewNode(discard: DiscardMode.Unmap);
        var b2 = s2.Add("b0");
        await unmapping.DiscardAsync(0, MiB);
        b2.Count.Should().Be(MiB);
    }

    [Fact]
    public async Task Concurrent_writes_all_land()
    {
        var (node, set) = NewNode(256 * MiB);
        var b = set.Add("b0", 4096);
        var data = new byte[4096];
        await Parallel.ForAsync(0, 65536, async (i, ct) =>
        {
            await node.WriteAsync((long)i * 4096, data, cancellationToken: ct);
        });
        b.Count.Should().Be(256 * MiB);
    }

    [Fact]
    public void Clear_with_backup_restores_old_bits_and_keeps_writes_made_meanwhile()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        set.MarkDirty(0, 65536);
        using (var backup = b.ClearWithBackup())
        {
            b.Count.Should().Be(0);
            set.MarkDirty(MiB, 1);
            backup.Restore();
        }
        b.Count.Should().Be(2 * 65536);
        b.Bits.Get(0).Should().BeTrue();
        b.Bits.Get(MiB).Should().BeTrue();

        using (var backup = b.ClearWithBackup())
        {
            // commit: just drop the backup
        }
        b.Count.Should().Be(0);
        set.MarkDirty(0, 1);
        b.Count.Should().Be(65536);
    }

    // ------------------------------------------------------------------ merge

    [Fact]
    public void Merge_ors_sources_of_any_granularity_and_node()
    {
        var (_, set) = NewNode();
        var dst = set.Add("dst", 65536);
        var s1 = set.Add("s1", 512, disabled: true);
        var other = new MemoryNode(64 * MiB, "other").GetDirtyBitmaps();
        var s2 = other.Add("s2", 1 << 20);
        s1.SetDirty(4096, 1);
        s2.SetDirty(10 * MiB, 1);
        DirtyBitmapSet.Merge(dst, [s1, s2]).Should().BeNull();
        dst.Bits.DirtyExtents().Should().Equal(new BitmapExtent(0, 65536), new BitmapExtent(10 * MiB, MiB));
        s1.Count.Should().Be(512);
    }

    [Fact]
    public void Merge_checks_destination_then_sources_and_changes_nothing_on_error()
    {
        var (_, set) = NewNode();
        var dst = set.Add("dst");
        var ok = set.Add("ok");
        ok.SetDirty(0, 1);
        var busy = set.Add("busy");
        busy.SetBusy(true);
        var small = new MemoryNode(32 * MiB, "small").GetDirtyBitmaps().Add("small");

        FluentActions.Invoking(() => DirtyBitmapSet.Merge(dst, [ok, busy])).Should().Throw<BlockException>()
            .WithMessage("Bitmap 'busy' is currently in use by another operation and cannot be used");
        FluentActions.Invoking(() => DirtyBitmapSet.Merge(dst, [ok, small])).Should().Throw<BlockException>()
            .WithMessage("Bitmaps are of different sizes (destination size is 67108864, source size is 33554432) and can't be merged");
        dst.Count.Should().Be(0);

        var ro = set.Add("ro");
        ro.SetReadOnly(true);
        FluentActions.Invoking(() => DirtyBitmapSet.Merge(ro, [ok])).Should().Throw<BlockException>()
            .WithMessage("Bitmap 'ro' is readonly and cannot be modified");
        // A readonly source is fine.
        DirtyBitmapSet.Merge(dst, [ro, ok]);
        dst.Count.Should().Be(65536);
    }

    [Fact]
    public void Merge_with_backup_can_be_undone()
    {
        var (_, set) = NewNode();
        var dst = set.Add("dst");
        var src = set.Add("src");
        dst.SetDirty(0, 1);
        src.SetDirty(MiB, 1);
        var backup = DirtyBitmapSet.Merge(dst, [src], withBackup: true)!;
        dst.Count.Should().Be(2 * 65536);
        set.MarkDirty(2 * MiB, 1); // a write while the transaction runs
        backup.Restore();
        backup.Dispose();
        dst.Bits.DirtyExtents().Should().Equal(new BitmapExtent(0, 65536), new BitmapExtent(2 * MiB, 65536));
    }

    // ------------------------------------------------------------------ successors

    [Fact]
    public void Freeze_redirects_writes_to_an_anonymous_successor_listed_by_the_query()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        set.MarkDirty(0, 1);
        var successor = set.Freeze(b);
        b.Busy.Should().BeTrue();
        b.IsFrozen.Should().BeTrue();
        b.Enabled.Should().BeFalse();
        b.Recording.Should().BeTrue("QMP reports recording while the successor records");
        set.MarkDirty(MiB, 1);
        b.Count.Should().Be(65536, "the frozen bitmap keeps its bits");
        successor.Count.Should().Be(65536);
        var copy = set.CreateAnonymous(65536, enabled: false);
        copy.Bits.Merge(b.Bits);
        set.Query().Select(i => i.Name).Should().Equal(null, null, "b0");
        set.Query()[2].Busy.Should().BeTrue();
        b.Invoking(x => x.Check(BitmapCheck.AllowReadOnly)).Should().Throw<BlockException>()
            .WithMessage("Bitmap 'b0' is currently in use by another operation and cannot be used");
        set.Invoking(s => s.Freeze(b)).Should().Throw<BlockException>()
            .WithMessage("Cannot create a successor for a bitmap that is in-use by an operation");
        set.Invoking(s => s.Remove("b0")).Should().Throw<BlockException>();
        set.Invoking(s => s.Release(successor)).Should().Throw<InvalidOperationException>();
        set.Release(copy);
    }

    [Fact]
    public void Abdicate_keeps_only_writes_made_during_the_job()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        set.MarkDirty(0, 1);
        set.Freeze(b);
        set.MarkDirty(MiB, 1);
        set.Abdicate(b);
        b.Bits.DirtyExtents().Should().Equal(new BitmapExtent(MiB, 65536));
        b.Busy.Should().BeFalse();
        b.Enabled.Should().BeTrue();
        set.Bitmaps.Should().Equal(b);
        set.MarkDirty(2 * MiB, 1);
        b.Count.Should().Be(2 * 65536);
        set.Invoking(s => s.Abdicate(b)).Should().Throw<BlockException>()
            .WithMessage("Cannot relinquish control if there's no successor present");
    }

    [Fact]
    public void Reclaim_loses_nothing()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        set.MarkDirty(0, 1);
        set.Freeze(b);
        set.MarkDirty(MiB, 1);
        set.Reclaim(b);
        b.Bits.DirtyExtents().Should().Equal(new BitmapExtent(0, 65536), new BitmapExtent(MiB, 65536));
        b.Busy.Should().BeFalse();
        b.Recording.Should().BeTrue();
        set.Bitmaps.Should().Equal(b);
        set.Invoking(s => s.Reclaim(b)).Should().Throw<BlockException>()
            .WithMessage("Cannot reclaim a successor when none is present");
    }

    [Fact]
    public void Disabled_bitmap_stays_disabled_through_a_job()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0", disabled: true);
        b.SetDirty(0, 1);
        var successor = set.Freeze(b);
        successor.Enabled.Should().BeFalse();
        b.Recording.Should().BeFalse();
        set.MarkDirty(MiB, 1);
        set.Abdicate(b);
        b.Count.Should().Be(0);
        b.Enabled.Should().BeFalse();
    }

    [Fact]
    public void Abdicate_moves_the_bitmap_to_the_successors_place_in_the_query_order()
    {
        var (_, set) = NewNode();
        var b0 = set.Add("b0");
        set.Add("b1");
        set.Query().Select(i => i.Name).Should().Equal("b1", "b0");
        set.Freeze(b0);
        set.Abdicate(b0);
        set.Query().Select(i => i.Name).Should().Equal("b0", "b1");
        set.Freeze(set.Get("b1"));
        set.Reclaim(set.Get("b1"));
        set.Query().Select(i => i.Name).Should().Equal("b0", "b1");
    }

    [Theory]
    [InlineData(BitmapSyncMode.OnSuccess, true, new[] { 1 })]
    [InlineData(BitmapSyncMode.OnSuccess, false, new[] { 0, 1, 2 })]
    [InlineData(BitmapSyncMode.Never, true, new[] { 0, 1, 2 })]
    [InlineData(BitmapSyncMode.Never, false, new[] { 0, 1, 2 })]
    [InlineData(BitmapSyncMode.Always, true, new[] { 1 })]
    [InlineData(BitmapSyncMode.Always, false, new[] { 1, 2 })]
    public void Complete_follows_the_bitmap_sync_mode(BitmapSyncMode mode, bool success, int[] expectedMiB)
    {
        // Before the job: 0 MiB and 2 MiB dirty. The job copied 0 MiB but not 2 MiB; a write hit 1 MiB meanwhile.
        var (_, set) = NewNode();
        var b = set.Add("b0");
        set.MarkDirty(0, 1);
        set.MarkDirty(2 * MiB, 1);
        set.Freeze(b);
        var copy = set.CreateAnonymous(65536, enabled: false);
        copy.Bits.Merge(b.Bits);
        copy.ResetDirty(0, 65536);
        set.MarkDirty(MiB, 1);
        set.Complete(b, mode, success, copy.Bits);
        set.Release(copy);
        b.Bits.DirtyExtents().Select(e => e.Offset / MiB).Should().Equal(expectedMiB.Select(x => (long)x));
        b.Busy.Should().BeFalse();
        b.IsFrozen.Should().BeFalse();
        set.Bitmaps.Should().Equal(b);
    }

    [Fact]
    public void Meta_bitmap_follows_the_bitmap_through_abdicate()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        var meta = b.CreateMeta(1);
        set.MarkDirty(0, 1);
        meta.NextDirtyExtent(0).Should().Be(new BitmapExtent(0, 8 * 65536));
        meta.Clear();
        set.Freeze(b);
        set.Abdicate(b);
        b.Meta.Should().NotBeNull();
        b.Meta!.DirtyByteCount.Should().BeGreaterThanOrEqualTo(64 * MiB, "after a swap every part may have changed");
        b.ReleaseMeta();
        b.Meta.Should().BeNull();
    }

    [Fact]
    public void Truncate_resizes_every_bitmap_unless_one_is_busy()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        b.SetDirty(0, 64 * MiB);
        set.Truncate(32 * MiB);
        b.Size.Should().Be(32 * MiB);
        b.Count.Should().Be(32 * MiB);
        b.SetBusy(true);
        set.Invoking(s => s.Truncate(MiB)).Should().Throw<InvalidOperationException>();
    }

    [Fact]
    public void Writes_past_the_bitmap_end_are_cut_not_thrown()
    {
        var (_, set) = NewNode(MiB);
        var b = set.Add("b0");
        set.MarkDirty(MiB - 1, 100);
        set.MarkDirty(2 * MiB, 100);
        b.Count.Should().Be(65536);
    }

    [Fact]
    public async Task No_write_is_lost_while_jobs_freeze_and_reclaim_concurrently()
    {
        var (_, set) = NewNode(256 * MiB);
        var b = set.Add("b0", 4096);
        var chunks = 256 * MiB / 4096;
        using var done = new CancellationTokenSource();
        var jobs = Task.Run(() =>
        {
            var rounds = 0;
            while (!done.IsCancellationRequested || rounds < 10)
            {
                set.Freeze(b);
                Thread.Yield();
                set.Reclaim(b);
                using (var backup = b.ClearWithBackup())
                {
                    backup.Restore();
                }
                rounds++;
            }
        });
        Parallel.For(0, 4, t =>
        {
            for (long c = t; c < chunks; c += 4)
            {
                set.MarkDirty(c * 4096, 4096);
            }
        });
        done.Cancel();
        await jobs;
        b.Count.Should().Be(256 * MiB);
        b.IsFrozen.Should().BeFalse();
    }

    [Fact]
    public void Successor_has_the_size_of_the_bitmap()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        set.Truncate(32 * MiB);
        set.Freeze(b).Size.Should().Be(32 * MiB);
        set.Reclaim(b);
        b.Size.Should().Be(32 * MiB);
    }

    [Fact]
    public void Command_helpers_check_like_qsd()
    {
        var (_, set) = NewNode();
        var b = set.Add("b0");
        b.SetDirty(0, 1);
        set.Sha256("b0").Should().Be(b.Sha256());
        set.Disable("b0").Recording.Should().BeFalse();
        set.Enable("b0").Recording.Should().BeTrue();
        b.SetReadOnly(true);
        set.Invoking(s => s.Clear("b0")).Should().Throw<BlockException>().WithMessage("Bitmap 'b0' is readonly and cannot be modified");
        set.Disable("b0").Enabled.Should().BeFalse("enable/disable allow readonly bitmaps");
        b.SetReadOnly(false);
        set.Clear("b0").Count.Should().Be(0);
        b.SetBusy(true);
        set.Invoking(s => s.Enable("b0")).Should().Throw<BlockException>().WithMessage("Bitmap 'b0' is currently in use*");
        set.Invoking(s => s.Clear("nope")).Should().Throw<BlockException>().WithMessage("Dirty bitmap 'nope' not found");
    }
}
