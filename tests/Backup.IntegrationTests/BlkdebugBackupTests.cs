using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Backups under faults injected with blkdebug, as QEMU's iotests inject them: at the first write, at a
/// write in the middle reached by state, at the last write, on a target that stops the job, and on a
/// source read after a flush. Every scenario runs against backupd and against qemu-storage-daemon 7.2
/// with the same expectations (recorded from QSD first): the job's events, the sync bitmap's count
/// afterwards (every uncopied bit, nothing more), and the data (qemu-img compare against the disk).
/// </summary>
public sealed class BlkdebugBackupTests : IAsyncLifetime
{
    private const int MiB = 1 << 20;
    private string _dir = "";
    private DaemonProcess? _daemon;
    private QmpClient? _qmp;

    private QmpClient Qmp => _qmp!;

    private string Nbd => $"nbd+unix:///drive0?socket={Path.Combine(_dir, "nbd.sock")}";

    public Task InitializeAsync()
    {
        _dir = DaemonProcess.NewDirectory();
        return Task.CompletedTask;
    }

    public Task DisposeAsync() => DaemonProcess.ShutdownAsync(_qmp, _daemon);

    private static Task<string> RunAsync(string file, params string[] args) => Tool.RunAsync(file, args);

    /// <summary>Starts <paramref name="daemon"/> ("backupd" or "qsd") with drive0 = qcow2 over <paramref name="sourceFile"/>, exported over NBD.</summary>
    private async Task StartAsync(string daemon, JsonObject? sourceFile = null)
    {
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_dir, "disk.qcow2"), "64M");
        sourceFile ??= new JsonObject { ["driver"] = "file", ["filename"] = Path.Combine(_dir, "disk.qcow2") };
        var drive = new JsonObject { ["driver"] = "qcow2", ["node-name"] = "drive0", ["file"] = sourceFile };
        _daemon = await DaemonProcess.StartAsync(
        [
            "--blockdev", drive.ToJsonString(),
            "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(_dir, "nbd.sock")}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on",
        ], _dir, executable: daemon == "qsd" ? "qemu-storage-daemon" : null);
        _qmp = await _daemon.ConnectAsync();
        await ExecuteOkAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0" });
    }

    private JsonObject FileOf(string name) => new() { ["driver"] = "file", ["filename"] = Path.Combine(_dir, name) };

    private string _targetFormat = "qcow2";

    private string TargetFile => $"t.{_targetFormat}";

    /// <summary>
    /// Adds node <c>t</c>: a new 64 MiB image (qcow2, or raw) whose file is a blkdebug filter with
    /// <paramref name="rules"/>. Sectors in rules are offsets in that file: for qcow2, host offsets.
    /// </summary>
    private async Task AddBlkdebugTargetAsync(JsonObject rules, string format = "qcow2")
    {
        _targetFormat = format;
        await RunAsync("qemu-img", "create", "-q", "-f", format, Path.Combine(_dir, TargetFile), "64M");
        rules["driver"] = "blkdebug";
        rules["image"] = FileOf(TargetFile);
        await ExecuteOkAsync("blockdev-add", new JsonObject { ["driver"] = format, ["node-name"] = "t", ["file"] = rules });
    }

    private Task<string> GuestWriteAsync(byte pattern, long offset, long length) =>
        RunAsync("qemu-io", "-f", "raw", Nbd, "-c", $"write -P 0x{pattern:x2} {offset} {length}");

    private async Task<string> SnapshotAsync()
    {
        var path = Path.Combine(_dir, "snap.raw");
        File.Delete(path);
        await RunAsync("qemu-img", "convert", "-f", "raw", "-O", "raw", Nbd, path);
        return path;
    }

    /// <summary>Closes the target node (so its image is complete on disk) and compares it with the disk now.</summary>
    private async Task TargetEqualsDiskAsync(string? target = null)
    {
        var snap = await SnapshotAsync();
        if (target is null)
        {
            await ExecuteOkAsync("blockdev-del", new JsonObject { ["node-name"] = "t" });
        }
        await RunAsync("qemu-img", "compare", "-f", target is null ? _targetFormat : "qcow2", "-F", "raw",
            Path.Combine(_dir, target ?? TargetFile), snap);
    }

    private async Task<JsonObject> ExecuteOkAsync(string command, object arguments)
    {
        var reply = await Qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("return", reply.ToJsonString());
        return reply;
    }

    private async Task<long> BitmapCountAsync()
    {
        var nodes = (await Qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        var drive = nodes.First(n => n!["node-name"]!.GetValue<string>() == "drive0")!;
        return drive["dirty-bitmaps"]!.AsArray().First(b => b!["name"]?.GetValue<string>() == "b0")!["count"]!.GetValue<long>();
    }

    /// <summary>The events of job <paramref name="id"/> up to its end; <paramref name="onEvent"/> sees each as it comes.</summary>
    private async Task<List<JsonObject>> JobEventsAsync(string id, Func<JsonObject, Task>? onEvent = null)
    {
        var list = new List<JsonObject>();
        while (true)
        {
            var e = await Qmp.NextEventAsync(TimeSpan.FromSeconds(60));
            var data = e["data"]!.AsObject();
            if ((string?)(data["id"] ?? data["device"]) != id)
            {
                continue;
            }
            list.Add(e);
            if (onEvent is not null)
            {
                await onEvent(e);
            }
            if (Name(e) == "null")
            {
                return list;
            }
        }
    }

    private static string Name(JsonObject e) =>
        e["event"]!.GetValue<string>() == "JOB_STATUS_CHANGE" ? e["data"]!["status"]!.GetValue<string>() : e["event"]!.GetValue<string>();

    /// <summary>The sequence with QSD's drain pauses (a "paused" right after "running", and the "running" after it) left out.</summary>
    private static string Collapsed(List<JsonObject> events)
    {
        var names = events.Select(Name).ToList();
        for (var i = names.Count - 2; i >= 1; i--)
        {
            if (names[i] == "paused" && names[i + 1] == "running" && names[i - 1] == "running")
            {
                names.RemoveRange(i, 2);
            }
        }
        return string.Join(' ', names);
    }

    private static JsonNode Data(List<JsonObject> events, string name) => events.Single(e => e["event"]!.GetValue<string>() == name)["data"]!;

    private static void FailedOnce(List<JsonObject> events, string operation)
    {
        Collapsed(events).Should().Be("created running BLOCK_JOB_ERROR aborting BLOCK_JOB_COMPLETED concluded null");
        Data(events, "BLOCK_JOB_ERROR")["operation"]!.GetValue<string>().Should().Be(operation);
        Data(events, "BLOCK_JOB_ERROR")["action"]!.GetValue<string>().Should().Be("report");
        Data(events, "BLOCK_JOB_COMPLETED")["error"]!.GetValue<string>().Should().Be("Input/output error");
    }

    private static JsonObject Rules(string json) => JsonNode.Parse(json)!.AsObject();

    private static JsonObject Backup(string id, string bitmapMode = "on-success", string target = "t") => new()
    {
        ["job-id"] = id, ["device"] = "drive0", ["target"] = target, ["sync"] = "bitmap", ["bitmap"] = "b0", ["bitmap-mode"] = bitmapMode,
    };

    /// <summary>A second backup into the same target with the bitmap as the failure left it: it must copy exactly that, and complete the image.</summary>
    private async Task RetryIntoSameTargetCoversTheRestAsync(long expectedLen)
    {
        await ExecuteOkAsync("blockdev-backup", Backup("j2", "always"));
        var events = await JobEventsAsync("j2");
        Collapsed(events).Should().Be("created running waiting pending BLOCK_JOB_COMPLETED concluded null");
        Data(events, "BLOCK_JOB_COMPLETED")["len"]!.GetValue<long>().Should().Be(expectedLen);
        (await BitmapCountAsync()).Should().Be(0);
        await TargetEqualsDiskAsync();
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task A_failure_at_the_first_write_keeps_every_bit_and_a_retry_covers_everything(string daemon)
    {
        await StartAsync(daemon);
        await GuestWriteAsync(0x81, 0, 2 * MiB);
        await AddBlkdebugTargetAsync(Rules("""{"inject-error": [{"event": "write_aio", "once": true}]}"""));
        await ExecuteOkAsync("blockdev-backup", Backup("j1"));
        FailedOnce(await JobEventsAsync("j1"), "write");
        (await BitmapCountAsync()).Should().Be(2 * MiB);

        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "j2", ["device"] = "drive0", ["sync"] = "incremental", ["bitmap"] = "b0",
            ["target"] = Path.Combine(_dir, "retry.qcow2"), ["format"] = "qcow2",
        });
        Collapsed(await JobEventsAsync("j2")).Should().EndWith("BLOCK_JOB_COMPLETED concluded null");
        (await BitmapCountAsync()).Should().Be(0);
        await TargetEqualsDiskAsync("retry.qcow2");
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task A_failure_in_the_middle_reached_by_state_leaves_exactly_the_uncopied_bits(string daemon)
    {
        // set-state moves 1 -> 2 -> 3 on the first two data writes; the third fails, once.
        await StartAsync(daemon);
        await GuestWriteAsync(0x82, 0, 8 * MiB);
        await AddBlkdebugTargetAsync(Rules("""
            {"set-state": [{"event": "write_aio", "state": 1, "new_state": 2}, {"event": "write_aio", "state": 2, "new_state": 3}],
             "inject-error": [{"event": "write_aio", "state": 3, "once": true}]}
            """));
        await ExecuteOkAsync("blockdev-backup", Backup("j1", "always"));
        FailedOnce(await JobEventsAsync("j1"), "write");
        var left = await BitmapCountAsync();
        left.Should().BeGreaterThan(0).And.BeLessThan(8 * MiB, "the first two writes reached the target");
        left.Should().Be(await UncopiedAsync(8 * MiB), "the bitmap holds what the target lacks, nothing more");
        await RetryIntoSameTargetCoversTheRestAsync(left);
    }

    /// <summary>
    /// Closes the failed target and counts what reached it in [0, <paramref name="end"/>) (its data clusters,
    /// from qemu-img map), then opens it again without rules: the bytes the job did not copy.
    /// </summary>
    private async Task<long> UncopiedAsync(long end)
    {
        await ExecuteOkAsync("blockdev-del", new JsonObject { ["node-name"] = "t" });
        var map = JsonNode.Parse(await RunAsync("qemu-img", "map", "--output=json", "-f", _targetFormat, Path.Combine(_dir, TargetFile)))!.AsArray();
        var copied = map.Where(m => m!["data"]!.GetValue<bool>() && m["depth"]!.GetValue<int>() == 0)
            .Sum(m => Math.Max(0, Math.Min(end, m!["start"]!.GetValue<long>() + m["length"]!.GetValue<long>()) - m["start"]!.GetValue<long>()));
        await ExecuteOkAsync("blockdev-add", new JsonObject { ["driver"] = _targetFormat, ["node-name"] = "t", ["file"] = FileOf(TargetFile) });
        return end - copied;
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task Guest_writes_during_a_failing_job_join_the_uncopied_bits_and_the_retry_covers_both(string daemon)
    {
        await StartAsync(daemon);
        await GuestWriteAsync(0x86, 0, 8 * MiB);
        await AddBlkdebugTargetAsync(Rules("""
            {"set-state": [{"event": "write_aio", "state": 1, "new_state": 2}, {"event": "write_aio", "state": 2, "new_state": 3},
                           {"event": "write_aio", "state": 3, "new_state": 4}],
             "inject-error": [{"event": "write_aio", "state": 4, "once": true}]}
            """));
        var backup = Backup("j1", "always");
        backup["speed"] = 2 * MiB;
        await ExecuteOkAsync("blockdev-backup", backup);
        // Outside the area being copied: no copy-before-write, the writes go to the bitmap's successor.
        await GuestWriteAsync(0x96, 20 * MiB, 65536);
        await GuestWriteAsync(0x97, 40 * MiB + 4096, 4096);
        FailedOnce(await JobEventsAsync("j1"), "write");
        var uncopied = await UncopiedAsync(8 * MiB);
        uncopied.Should().BeGreaterThan(0);
        (await BitmapCountAsync()).Should().Be(uncopied + 2 * 65536, "every uncopied bit plus the guest's two clusters, nothing more");
        await RetryIntoSameTargetCoversTheRestAsync(uncopied + 2 * 65536);
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task By_default_a_failing_copy_before_write_fails_the_guest_write(string daemon)
    {
        // QEMU's backup filter uses on-cbw-error=break-guest-write: the old data must reach the target
        // before the guest write goes on, so a failed copy fails the guest's write.
        await StartAsync(daemon);
        await GuestWriteAsync(0x87, 0, 8 * MiB);
        await AddBlkdebugTargetAsync(Rules($$"""{"inject-error": [{"event": "write_aio", "sector": {{7 * MiB / 512}}, "once": true}]}"""), "raw");
        var backup = Backup("j1", "always");
        backup["speed"] = 256 * 1024;
        backup["x-perf"] = new JsonObject { ["max-workers"] = 1 };
        await ExecuteOkAsync("blockdev-backup", backup);
        var (_, stdout, stderr) = await Tool.RunWithExitCodeAsync("qemu-io", "-f", "raw", Nbd, "-c", "write -P 0x98 7M 4k");
        (stdout + stderr).Should().Contain("write failed: Input/output error");
        await ExecuteOkAsync("block-job-set-speed", new JsonObject { ["device"] = "j1", ["speed"] = 0 });
        var events = await JobEventsAsync("j1");
        Collapsed(events).Should().Be("created running waiting pending BLOCK_JOB_COMPLETED concluded null",
            "the once rule was spent on the guest's copy; the job's own copy of that chunk succeeds");
        (await BitmapCountAsync()).Should().Be(0);
        await TargetEqualsDiskAsync();
    }

    [Fact]
    public async Task With_break_snapshot_a_failing_copy_before_write_fails_the_job_and_the_retry_still_covers_everything()
    {
        // backupd's extension: with on-cbw-error=break-snapshot the guest write goes on once the old data is
        // read, and the deferred target write's failure is the job's (docs/architecture.md).
        await StartAsync("backupd");
        await GuestWriteAsync(0x87, 0, 8 * MiB);
        // A raw target, so the sector is the guest's: 7 MiB. The slow job is far from it when the guest
        // overwrites it, so the copy-before-write's target write is the one that fails.
        await AddBlkdebugTargetAsync(Rules($$"""{"inject-error": [{"event": "write_aio", "sector": {{7 * MiB / 512}}, "once": true}]}"""), "raw");
        // One worker, 1 MiB chunks, 256 KiB/s: the job copies [0, 1M) and sleeps about 4 s before the next.
        var backup = Backup("j1", "always");
        backup["speed"] = 256 * 1024;
        backup["x-perf"] = new JsonObject { ["max-workers"] = 1 };
        backup["on-cbw-error"] = "break-snapshot";
        await ExecuteOkAsync("blockdev-backup", backup);
        await GuestWriteAsync(0x98, 7 * MiB, 4096);
        FailedOnce(await JobEventsAsync("j1"), "write");
        var uncopied = await UncopiedAsync(8 * MiB);
        (await BitmapCountAsync()).Should().Be(uncopied, "the guest's cluster is among the uncopied ones");
        await RetryIntoSameTargetCoversTheRestAsync(uncopied);
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task A_failure_at_the_last_write_puts_back_only_its_chunk(string daemon)
    {
        await StartAsync(daemon);
        await GuestWriteAsync(0x83, 0, 2 * MiB);
        // The last sector of the dirty area (a raw target: the sector is the guest's): only the request
        // covering it fails (QSD: its 1 MiB chunk).
        await AddBlkdebugTargetAsync(Rules($$"""{"inject-error": [{"event": "write_aio", "sector": {{(2 * MiB - 512) / 512}}, "once": true}]}"""), "raw");
        await ExecuteOkAsync("blockdev-backup", Backup("j1", "always"));
        FailedOnce(await JobEventsAsync("j1"), "write");
        (await BitmapCountAsync()).Should().Be(MiB).And.Be(await UncopiedAsync(2 * MiB));
        await RetryIntoSameTargetCoversTheRestAsync(MiB);
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task On_target_error_stop_with_a_once_rule_finishes_after_resume_and_equals_the_source(string daemon)
    {
        await StartAsync(daemon);
        await GuestWriteAsync(0x84, 0, 2 * MiB);
        await AddBlkdebugTargetAsync(Rules("""{"inject-error": [{"event": "write_aio", "once": true}]}"""));
        var backup = Backup("j1");
        backup["sync"] = "incremental";
        backup.Remove("bitmap-mode");
        backup["on-target-error"] = "stop";
        await ExecuteOkAsync("blockdev-backup", backup);
        long? whilePaused = null;
        var sawError = false;
        var events = await JobEventsAsync("j1", async e =>
        {
            sawError |= Name(e) == "BLOCK_JOB_ERROR";
            if (sawError && whilePaused is null && Name(e) == "paused")
            {
                whilePaused = await BitmapCountAsync();
                await ExecuteOkAsync("block-job-resume", new { device = "j1" });
            }
        });
        var names = string.Join(' ', events.Select(Name));
        names.Should().Contain("BLOCK_JOB_ERROR paused running").And.EndWith("waiting pending BLOCK_JOB_COMPLETED concluded null");
        events.Count(e => Name(e) == "BLOCK_JOB_ERROR").Should().Be(1, "the once rule is gone after its failure");
        Data(events, "BLOCK_JOB_ERROR")["action"]!.GetValue<string>().Should().Be("stop");
        Data(events, "BLOCK_JOB_COMPLETED")["error"].Should().BeNull();
        whilePaused.Should().Be(2 * MiB, "QSD shows the frozen bitmap's count while the job runs");
        (await BitmapCountAsync()).Should().Be(0);
        await TargetEqualsDiskAsync();
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task A_source_read_failing_after_the_first_flush_fails_the_job_and_keeps_the_bitmap(string daemon)
    {
        // iotest 124's way: the guest's write and flush move the source's blkdebug to state 2, where the
        // next data read (the backup's) fails once.
        var source = Rules("""
            {"driver": "blkdebug",
             "set-state": [{"event": "flush_to_disk", "state": 1, "new_state": 2}],
             "inject-error": [{"event": "read_aio", "state": 2, "once": true}]}
            """);
        source["image"] = FileOf("disk.qcow2");
        await StartAsync(daemon, source);
        await GuestWriteAsync(0x85, 0, 2 * MiB);
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_dir, "t.qcow2"), "64M");
        await ExecuteOkAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = "t", ["file"] = FileOf("t.qcow2") });
        await ExecuteOkAsync("blockdev-backup", Backup("j1"));
        FailedOnce(await JobEventsAsync("j1"), "read");
        (await BitmapCountAsync()).Should().Be(2 * MiB);
        await RetryIntoSameTargetCoversTheRestAsync(2 * MiB);
    }
}
