using Backup.Block.Bitmaps;

namespace Backup.Block.Tests.Bitmaps;

/// <summary>
/// The tracker's promise and its batching, with a journal that records what it is asked to make durable
/// (the qcow2 journal itself is tested with real images in Qcow2CrashConsistentBitmapTests).
/// </summary>
public sealed class CrashConsistentTrackerTests
{
    private const long MiB = 1 << 20;

    /// <summary>Records each update; can hold updates back or fail the next one.</summary>
    private sealed class RecordingJournal : ICrashJournal
    {
        public List<long[]> Updates { get; } = [];

        public TaskCompletionSource? Gate { get; set; }

        public bool FailNext { get; set; }

        public long RegionSize => MiB;

        public async ValueTask PersistAsync(IReadOnlyList<long> regions, CancellationToken cancellationToken)
        {
            if (Gate is { } gate)
            {
                await gate.Task;
            }
            lock (Updates)
            {
                if (FailNext)
                {
                    FailNext = false;
                    throw new IOException("journal write failed");
                }
                Updates.Add([.. regions]);
            }
        }
    }

    private static (MemoryNode Node, DirtyBitmap Bitmap, CrashConsistentTracker Tracker, RecordingJournal Journal) Track()
    {
        var node = new MemoryNode(64 * MiB);
        var bitmap = node.GetDirtyBitmaps().Add("cc", 65536);
        var journal = new RecordingJournal();
        var tracker = new CrashConsistentTracker(bitmap, journal);
        node.AddWriteObserver(tracker);
        return (node, bitmap, tracker, journal);
    }

    [Fact]
    public async Task A_write_waits_until_its_regions_are_durable_and_later_writes_into_them_cost_nothing()
    {
        var (node, _, tracker, journal) = Track();
        journal.Gate = new TaskCompletionSource();
        var write = node.WriteAsync(MiB - 512, new byte[1024]).AsTask();
        await Task.Delay(50);
        write.IsCompleted.Should().BeFalse("the write may not reach the disk before its regions are journaled");
        journal.Gate.SetResult();
        await write;
        journal.Updates.Should().ContainSingle().Which.Should().Equal(0, 1);

        await node.WriteAsync(MiB + 4096, new byte[4096]);
        journal.Updates.Should().HaveCount(1, "region 1 is durable already");
        tracker.DurableRegions.Should().Be(2);
    }

    [Fact]
    public async Task Writers_arriving_during_an_update_share_the_next_one()
    {
        var (node, _, _, journal) = Track();
        journal.Gate = new TaskCompletionSource();
        var first = node.WriteAsync(0, new byte[512]).AsTask();
        await Task.Delay(20);
        var others = Enumerable.Range(1, 30).Select(i => node.WriteAsync(i * MiB, new byte[512]).AsTask()).ToList();
        await Task.Delay(20);
        journal.Gate.SetResult();
        await Task.WhenAll(others.Append(first));
        journal.Updates.Should().HaveCount(2, "one update for the first writer, one for all who queued meanwhile");
        journal.Updates[1].Should().HaveCount(30);
    }

    [Fact]
    public async Task A_failed_update_fails_its_writes_and_the_next_write_journals_the_region_again()
    {
        var (node, bitmap, _, journal) = Track();
        journal.FailNext = true;
        var failed = () => node.WriteAsync(5 * MiB, new byte[512]).AsTask();
        await failed.Should().ThrowAsync<IOException>();
        bitmap.Count.Should().Be(0, "the write never happened");
        await node.WriteAsync(5 * MiB, new byte[512]);
        journal.Updates.Should().ContainSingle().Which.Should().Equal(5);
    }

    [Fact]
    public async Task A_disabled_bitmap_journals_nothing_and_a_detached_tracker_stops()
    {
        var (node, bitmap, tracker, journal) = Track();
        bitmap.Disable();
        await node.WriteAsync(0, new byte[512]);
        journal.Updates.Should().BeEmpty();
        bitmap.Enable();
        await tracker.DetachAsync();
        await node.WriteAsync(0, new byte[512]);
        journal.Updates.Should().BeEmpty();
    }
}
