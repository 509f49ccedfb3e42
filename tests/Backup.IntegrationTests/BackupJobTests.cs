using System.Diagnostics;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Backups end to end, in the style of QEMU's iotests 124 and 257: the real daemon, guest I/O with
/// qemu-io through the NBD export, and every backup (the top of its qcow2 chain) compared with
/// qemu-img against a copy of the disk taken when its job started.
/// </summary>
public sealed class BackupJobTests : IAsyncLifetime
{
    private const int MiB = 1 << 20;
    private string _dir = "";
    private DaemonProcess? _daemon;
    private QmpClient? _qmp;
    private int _snapshots;

    private QmpClient Qmp => _qmp!;

    private string Nbd => $"nbd+unix:///drive0?socket={Path.Combine(_dir, "nbd.sock")}";

    public async Task InitializeAsync()
    {
        _dir = DaemonProcess.NewDirectory();
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_dir, "disk.qcow2"), "64M");
        _daemon = await DaemonProcess.StartAsync(
        [
            "--blockdev", "driver=file,node-name=file0,filename=disk.qcow2",
            "--blockdev", "driver=qcow2,node-name=drive0,file=file0",
            "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(_dir, "nbd.sock")}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on",
        ], _dir);
        _qmp = await _daemon.ConnectAsync();
    }

    public Task DisposeAsync() => DaemonProcess.ShutdownAsync(_qmp, _daemon);

    private static Task<string> RunAsync(string file, params string[] args) => Tool.RunAsync(file, args);

    private Task<string> GuestWriteAsync(byte pattern, long offset, long length) =>
        RunAsync("qemu-io", "-f", "raw", Nbd, "-c", $"write -P 0x{pattern:x2} {offset} {length}");

    /// <summary>The disk as the guest sees it now, as a raw file.</summary>
    private async Task<string> SnapshotAsync()
    {
        var path = Path.Combine(_dir, $"snap{_snapshots++}.raw");
        await RunAsync("qemu-img", "convert", "-f", "raw", "-O", "raw", Nbd, path);
        return path;
    }

    private static Task<string> CompareAsync(string backup, string snapshot) =>
        RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", backup, snapshot);

    private async Task<JsonObject> ExecuteOkAsync(string command, object arguments)
    {
        var reply = await Qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("return", reply.ToJsonString());
        return reply;
    }

    /// <summary>Events of job <paramref name="id"/> until it reaches null (or concluded/pending when asked).</summary>
    private async Task<List<JsonObject>> JobEventsAsync(string id, string until = "null")
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
            if (e["event"]!.GetValue<string>() == "JOB_STATUS_CHANGE" && data["status"]!.GetValue<string>() == until)
            {
                return list;
            }
            if (until == "BLOCK_JOB_PENDING" && e["event"]!.GetValue<string>() == until)
            {
                return list;
            }
        }
    }

    private static string Sequence(List<JsonObject> events) => string.Join(' ', events.Select(e =>
        e["event"]!.GetValue<string>() == "JOB_STATUS_CHANGE" ? e["data"]!["status"]!.GetValue<string>() : e["event"]!.GetValue<string>()));

    private async Task<long> BitmapCountAsync()
    {
        var nodes = (await Qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        var drive = nodes.First(n => n!["node-name"]!.GetValue<string>() == "drive0")!;
        return drive["dirty-bitmaps"]!.AsArray().First(b => b!["name"]?.GetValue<string>() == "b0")!["count"]!.GetValue<long>();
    }

    [Fact]
    public async Task Full_then_three_incrementals_each_equal_the_disk_when_its_job_started()
    {
        await GuestWriteAsync(0x11, 0, 8 * MiB);
        await ExecuteOkAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0" });
        var snap = await SnapshotAsync();
        var previous = Path.Combine(_dir, "full.qcow2");
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "full", ["device"] = "drive0", ["sync"] = "full", ["target"] = previous, ["format"] = "qcow2",
        });
        var events = await JobEventsAsync("full");
        Sequence(events).Should().Be("created running waiting pending BLOCK_JOB_COMPLETED concluded null");
        await CompareAsync(previous, snap);

        for (var i = 1; i <= 3; i++)
        {
            await GuestWriteAsync((byte)(0x20 + i), i * 5 * MiB + 4096, 3 * 65536);
            await GuestWriteAsync((byte)(0x30 + i), 60 * MiB, 512);
            snap = await SnapshotAsync();
            var inc = Path.Combine(_dir, $"inc{i}.qcow2");
            await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", "-b", previous, "-F", "qcow2", inc, "64M");
            await ExecuteOkAsync("drive-backup", new JsonObject
            {
                ["job-id"] = $"inc{i}", ["device"] = "drive0", ["sync"] = "incremental", ["bitmap"] = "b0",
                ["target"] = inc, ["format"] = "qcow2", ["mode"] = "existing",
            });
            events = await JobEventsAsync($"inc{i}");
            var completed = events.Single(e => e["event"]!.GetValue<string>() == "BLOCK_JOB_COMPLETED")["data"]!;
            completed["len"]!.GetValue<long>().Should().Be(5 * 65536, "4 KiB + 192 KiB spans 4 clusters, plus one");
            await CompareAsync(inc, snap);
            (await BitmapCountAsync()).Should().Be(0);
            previous = inc;
        }
    }

    [Fact]
    public async Task Writes_during_a_speed_limited_backup_do_not_change_the_backup()
    {
        await GuestWriteAsync(0x42, 0, 16 * MiB);
        await ExecuteOkAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0" });
        var snap = await SnapshotAsync();
        var target = Path.Combine(_dir, "full.qcow2");
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "j0", ["device"] = "drive0", ["sync"] = "full", ["target"] = target, ["format"] = "qcow2", ["speed"] = MiB,
        });
        await GuestWriteAsync(0x55, 8 * MiB, 65536);
        await GuestWriteAsync(0x56, 100, 4096);
        await GuestWriteAsync(0x57, 40 * MiB, 65536);
        var jobs = (await Qmp.ExecuteAsync("query-block-jobs"))["return"]!.AsArray();
        jobs.Should().ContainSingle().Which!["status"]!.GetValue<string>().Should().Be("running");
        await ExecuteOkAsync("block-job-set-speed", new { device = "j0", speed = 0 });
        Sequence(await JobEventsAsync("j0")).Should().EndWith("BLOCK_JOB_COMPLETED concluded null");
        await CompareAsync(target, snap);
        (await BitmapCountAsync()).Should().Be(65536 + 65536 + 65536);
    }

    [Fact]
    public async Task Cancel_keeps_every_bit_and_a_retry_covers_everything()
    {
        await ExecuteOkAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0" });
        await GuestWriteAsync(0x61, 0, 4 * MiB);
        var target = Path.Combine(_dir, "t.qcow2");
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "j1", ["device"] = "drive0", ["sync"] = "incremental", ["bitmap"] = "b0",
            ["target"] = target, ["format"] = "qcow2", ["speed"] = MiB,
        });
        await GuestWriteAsync(0x62, 32 * MiB, 65536);
        await ExecuteOkAsync("job-cancel", new { id = "j1" });
        Sequence(await JobEventsAsync("j1")).Should().Be("created running aborting BLOCK_JOB_CANCELLED concluded null");
        (await BitmapCountAsync()).Should().Be(4 * MiB + 65536);

        var snap = await SnapshotAsync();
        var full = Path.Combine(_dir, "base.qcow2");
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", full, "64M");
        var retry = Path.Combine(_dir, "retry.qcow2");
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "qcow2", retry, "64M");
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "j2", ["device"] = "drive0", ["sync"] = "incremental", ["bitmap"] = "b0",
            ["target"] = retry, ["format"] = "qcow2", ["mode"] = "existing",
        });
        Sequence(await JobEventsAsync("j2")).Should().EndWith("BLOCK_JOB_COMPLETED concluded null");
        await CompareAsync(retry, snap);
    }

    [Fact]
    public async Task Manual_finalize_and_dismiss()
    {
        await ExecuteOkAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0" });
        await GuestWriteAsync(0x71, MiB, MiB);
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_dir, "inc.qcow2"), "64M");
        await ExecuteOkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "ti",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = Path.Combine(_dir, "inc.qcow2") },
        });
        await ExecuteOkAsync("blockdev-backup", new JsonObject
        {
            ["job-id"] = "j1", ["device"] = "drive0", ["target"] = "ti", ["sync"] = "incremental", ["bitmap"] = "b0",
            ["auto-finalize"] = false, ["auto-dismiss"] = false,
        });
        Sequence(await JobEventsAsync("j1", "BLOCK_JOB_PENDING")).Should().Be("created running waiting pending BLOCK_JOB_PENDING");
        (await BitmapCountAsync()).Should().Be(MiB, "the bitmap is only cleared at finalize");
        var del = await Qmp.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = "ti" });
        var dismiss = await Qmp.ExecuteAsync("job-dismiss", new { id = "j1" });
        dismiss["error"]!["desc"]!.GetValue<string>().Should().Be("Job 'j1' in state 'pending' cannot accept command verb 'dismiss'");
        await ExecuteOkAsync("job-finalize", new { id = "j1" });
        Sequence(await JobEventsAsync("j1", "concluded")).Should().Be("BLOCK_JOB_COMPLETED concluded");
        (await BitmapCountAsync()).Should().Be(0);
        await ExecuteOkAsync("job-dismiss", new { id = "j1" });
        (await Qmp.ExecuteAsync("query-jobs"))["return"]!.AsArray().Should().BeEmpty();
        del["error"]!["desc"]!.GetValue<string>().Should().Be("Node 'ti' is busy: block device is in use by block job: backup");
        await ExecuteOkAsync("blockdev-del", new JsonObject { ["node-name"] = "ti" });
    }

    [Fact]
    public async Task Injected_target_error_fails_the_job_keeps_the_bitmap_and_a_retry_covers_everything()
    {
        await ExecuteOkAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0" });
        await GuestWriteAsync(0x81, 0, 2 * MiB);
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_dir, "bad.qcow2"), "64M");
        await ExecuteOkAsync("blockdev-add", JsonNode.Parse($$$"""
            {"driver": "qcow2", "node-name": "tbad", "file": {"driver": "blkdebug",
             "image": {"driver": "file", "filename": "{{{Path.Combine(_dir, "bad.qcow2")}}}"},
             "inject-error": [{"event": "write_aio", "iotype": "write", "errno": 28}]}}
            """)!);
        await ExecuteOkAsync("blockdev-backup", new JsonObject
        {
            ["job-id"] = "j1", ["device"] = "drive0", ["target"] = "tbad", ["sync"] = "incremental", ["bitmap"] = "b0",
        });
        var events = await JobEventsAsync("j1");
        Sequence(events).Should().Be("created running BLOCK_JOB_ERROR aborting BLOCK_JOB_COMPLETED concluded null");
        var error = events.Single(e => e["event"]!.GetValue<string>() == "BLOCK_JOB_ERROR")["data"]!;
        error["operation"]!.GetValue<string>().Should().Be("write");
        error["action"]!.GetValue<string>().Should().Be("report");
        events.Single(e => e["event"]!.GetValue<string>() == "BLOCK_JOB_COMPLETED")["data"]!["error"]!.GetValue<string>()
            .Should().Be("No space left on device");
        (await BitmapCountAsync()).Should().Be(2 * MiB);

        var snap = await SnapshotAsync();
        var retry = Path.Combine(_dir, "retry.qcow2");
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "j2", ["device"] = "drive0", ["sync"] = "incremental", ["bitmap"] = "b0",
            ["target"] = retry, ["format"] = "qcow2",
        });
        Sequence(await JobEventsAsync("j2")).Should().EndWith("BLOCK_JOB_COMPLETED concluded null");
        await CompareAsync(retry, snap);
    }

    [Fact]
    public async Task Quit_during_a_backup_cancels_it_and_restores_the_bitmap_cleanly()
    {
        await ExecuteOkAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0" });
        await GuestWriteAsync(0x91, 0, 8 * MiB);
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "j1", ["device"] = "drive0", ["sync"] = "incremental", ["bitmap"] = "b0",
            ["target"] = Path.Combine(_dir, "t.qcow2"), ["format"] = "qcow2", ["speed"] = MiB,
        });
        await ExecuteOkAsync("quit", new JsonObject());
        (await _daemon!.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);
        _daemon.Stderr.Should().NotContain("[ERR]").And.NotContain("Unhandled");
        await RunAsync("qemu-img", "check", "-q", Path.Combine(_dir, "t.qcow2"));
        await RunAsync("qemu-img", "check", "-q", Path.Combine(_dir, "disk.qcow2"));
    }

    [Fact]
    public async Task Drive_backup_sync_top_copies_the_top_layer_over_the_same_backing()
    {
        var baseImage = Path.Combine(_dir, "base.qcow2");
        var top = Path.Combine(_dir, "top.qcow2");
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", baseImage, "64M");
        await RunAsync("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", baseImage);
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", "-b", baseImage, "-F", "qcow2", top);
        await RunAsync("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 128k", top);
        await ExecuteOkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "vm",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = top },
        });
        var target = Path.Combine(_dir, "topcopy.qcow2");
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "t", ["device"] = "vm", ["sync"] = "top", ["target"] = target, ["format"] = "qcow2",
        });
        var events = await JobEventsAsync("t");
        events.Single(e => e["event"]!.GetValue<string>() == "BLOCK_JOB_COMPLETED")["data"]!["len"]!.GetValue<long>()
            .Should().Be(2 * 65536, "only the top layer's two clusters");
        var info = await RunAsync("qemu-img", "info", "--output=json", target);
        JsonNode.Parse(info)!["backing-filename"]!.GetValue<string>().Should().Be(baseImage);
        // -U: the source is still open read-write in the daemon, which locks it as QEMU does.
        await RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", target, top);
    }
}
