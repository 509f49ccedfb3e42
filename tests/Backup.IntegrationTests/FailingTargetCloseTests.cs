using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// A backup target whose every write fails (EIO from blkdebug) still has metadata to write back when it
/// is closed. QEMU reports that on stderr and closes the node anyway: blockdev-del succeeds and takes the
/// node's children with it, and a quit still closes every other node cleanly, so the disk's persistent
/// bitmaps are stored. Found by the fault soak (tests/soak): blockdev-del answered "Internal error" and
/// left the target's children open, and a quit with such a target left the disk's bitmaps in use.
/// Same expectations for backupd and qemu-storage-daemon 7.2.
/// </summary>
public sealed class FailingTargetCloseTests : IAsyncLifetime
{
    private readonly string _dir = DaemonProcess.NewDirectory();
    private DaemonProcess? _daemon;
    private QmpClient? _qmp;

    private string Disk => Path.Combine(_dir, "disk.qcow2");

    public async Task InitializeAsync()
    {
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Disk, "64M");
        await Tool.RunAsync("qemu-io", "-f", "qcow2", Disk, "-c", "write -P 0x5a 0 4M");
        await Tool.RunAsync("qemu-img", "bitmap", "--add", Disk, "keep");
    }

    public async Task DisposeAsync()
    {
        // Disposing a daemon removes its directory; after a quit the test has let it go.
        await DaemonProcess.ShutdownAsync(_qmp, _daemon);
        if (Directory.Exists(_dir))
        {
            Directory.Delete(_dir, recursive: true);
        }
    }

    private async Task<QmpClient> StartAsync(string daemon)
    {
        _daemon = await DaemonProcess.StartAsync(
        [
            "--blockdev", $"driver=file,node-name=file0,filename={Disk}",
            "--blockdev", "driver=qcow2,node-name=drive0,file=file0",
        ], _dir, executable: daemon == "qsd" ? "qemu-storage-daemon" : null);
        _qmp = await _daemon.ConnectAsync();
        return _qmp;
    }

    /// <summary>Adds target <c>t</c> (qcow2 over blkdebug failing every write) and runs a full backup into it
    /// until it stops at the error, then cancels it: the target's caches now hold what they cannot write.</summary>
    private static async Task FailBackupAsync(QmpClient qmp, string dir, string name)
    {
        var target = Path.Combine(dir, name);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", target, "64M");
        var add = await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$$"""
            {"driver": "qcow2", "node-name": "t", "file": {"driver": "blkdebug",
              "image": {"driver": "file", "filename": "{{{target}}}"},
              "inject-error": [{"event": "write_aio", "errno": 5}]}}
            """));
        add.Should().ContainKey("return");
        (await qmp.ExecuteAsync("blockdev-backup", new JsonObject
        {
            ["job-id"] = "j", ["device"] = "drive0", ["target"] = "t", ["sync"] = "full", ["on-target-error"] = "stop",
        })).Should().ContainKey("return");
        await WaitEventAsync(qmp, "BLOCK_JOB_ERROR");
        (await qmp.ExecuteAsync("block-job-cancel", new { device = "j", force = true })).Should().ContainKey("return");
        await WaitEventAsync(qmp, "BLOCK_JOB_CANCELLED");
    }

    private static async Task WaitEventAsync(QmpClient qmp, string name)
    {
        while ((await qmp.NextEventAsync(TimeSpan.FromSeconds(30)))["event"]!.GetValue<string>() != name)
        {
        }
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task Blockdev_del_of_a_target_that_cannot_write_back_succeeds_and_closes_its_children(string daemon)
    {
        var qmp = await StartAsync(daemon);
        await FailBackupAsync(qmp, _dir, "t1.qcow2");

        (await qmp.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = "t" })).Should().ContainKey("return");

        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray()
            .Select(n => n!["node-name"]!.GetValue<string>()).Order(StringComparer.Ordinal);
        nodes.Should().Equal("drive0", "file0");
        // Its file is closed: the image is free for a writer again.
        await Tool.RunAsync("qemu-io", "-f", "qcow2", Path.Combine(_dir, "t1.qcow2"), "-c", "write 0 64k");
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task Quit_with_a_target_that_cannot_write_back_still_stores_the_disks_bitmaps(string daemon)
    {
        var qmp = await StartAsync(daemon);
        await FailBackupAsync(qmp, _dir, "t2.qcow2");

        await qmp.ExecuteAsync("quit");
        (await _daemon!.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);
        _daemon = null;
        _qmp = null;

        var info = JsonNode.Parse(await Tool.RunAsync("qemu-img", "info", "--output=json", Disk))!;
        var bitmap = info["format-specific"]!["data"]!["bitmaps"]!.AsArray().Single()!;
        bitmap["name"]!.GetValue<string>().Should().Be("keep");
        bitmap["flags"]!.AsArray().Select(f => f!.GetValue<string>()).Should().NotContain("in-use",
            "the disk was closed cleanly although another node's close failed");
        var check = await Tool.RunWithExitCodeAsync("qemu-img", "check", Disk);
        check.ExitCode.Should().Be(0, check.Stdout + check.Stderr);
    }
}
