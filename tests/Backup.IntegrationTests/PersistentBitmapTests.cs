using System.Diagnostics;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Persistent bitmaps end to end: the real daemon stores them in the qcow2 image at quit, SIGTERM and
/// blockdev-del; qemu-img and qemu-storage-daemon read and change them, and what they store loads in
/// backupd with the same x-debug-block-dirty-bitmap-sha256. After kill -9 the stored bitmaps come back
/// inconsistent. qemu-img check stays clean throughout.
/// </summary>
public sealed class PersistentBitmapTests : IDisposable
{
    private const long MiB = 1 << 20;
    private readonly string _images = DaemonProcess.NewDirectory();

    public void Dispose()
    {
        try
        {
            Directory.Delete(_images, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    private string Disk => Path.Combine(_images, "disk.qcow2");

    private static Task<string> RunAsync(string file, params string[] args) => Tool.RunAsync(file, args);

    /// <summary>backupd, or qemu-storage-daemon with <paramref name="qsd"/>, serving the disk as drive0 over NBD.</summary>
    private Task<(DaemonProcess Daemon, QmpClient Qmp)> StartAsync(bool qsd = false) =>
        DriveDaemon.StartAsync(Disk, qsd ? "qemu-storage-daemon" : null);

    private static async Task QuitAsync(DaemonProcess d, QmpClient qmp)
    {
        (await qmp.ExecuteAsync("quit")).Should().ContainKey("return");
        (await d.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0, d.Stderr);
        await qmp.DisposeAsync();
        await d.DisposeAsync();
    }

    private static Task<string> WriteAsync(DaemonProcess d, string command) =>
        RunAsync("qemu-io", "-f", "raw", DriveDaemon.NbdUri(d), "-c", command);

    private static async Task<JsonObject> OkAsync(QmpClient qmp, string command, object arguments)
    {
        var reply = await qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("return", reply.ToJsonString());
        return reply;
    }

    private static async Task<string> ErrorAsync(QmpClient qmp, string command, object arguments)
    {
        var reply = await qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("error", reply.ToJsonString());
        return reply["error"]!["desc"]!.GetValue<string>();
    }

    /// <summary>name → (recording, count, inconsistent, sha256) of drive0's named bitmaps.</summary>
    private static async Task<Dictionary<string, (bool Recording, long Count, bool Inconsistent, string Sha)>> BitmapsAsync(QmpClient qmp)
    {
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        var drive0 = nodes.Single(n => n!["node-name"]!.GetValue<string>() == "drive0")!;
        var result = new Dictionary<string, (bool, long, bool, string)>();
        foreach (var b in drive0["dirty-bitmaps"]?.AsArray() ?? [])
        {
            var name = b!["name"]!.GetValue<string>();
            var sha = (await OkAsync(qmp, "x-debug-block-dirty-bitmap-sha256", new { node = "drive0", name }))["return"]!["sha256"]!.GetValue<string>();
            result[name] = (b["recording"]!.GetValue<bool>(), b["count"]!.GetValue<long>(), b["inconsistent"]?.GetValue<bool>() ?? false, sha);
        }
        return result;
    }

    /// <summary>name → flags as qemu-img info lists the bitmaps stored in the image.</summary>
    private async Task<Dictionary<string, string>> ImageBitmapsAsync()
    {
        var info = JsonNode.Parse(await RunAsync("qemu-img", "info", "-U", "--output=json", Disk))!;
        var list = info["format-specific"]!["data"]!["bitmaps"]?.AsArray() ?? [];
        return list.ToDictionary(b => b!["name"]!.GetValue<string>(),
            b => string.Join(",", b!["flags"]!.AsArray().Select(f => f!.GetValue<string>()).Order(StringComparer.Ordinal)));
    }

    private async Task CheckCleanAsync() => await RunAsync("qemu-img", "check", "-U", Disk);

    [Fact]
    public async Task A_persistent_bitmap_survives_quit_and_restart_and_a_transient_one_does_not()
    {
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Disk, "64M");
        var (d, qmp) = await StartAsync();
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "pa", persistent = true });
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "p4k", persistent = true, granularity = 4096 });
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "tr" });
        await WriteAsync(d, "write -P 0x11 0 100k");
        await WriteAsync(d, "write -P 0x12 7340033 1");
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "pd", persistent = true, disabled = true });
        await WriteAsync(d, "write -z 33M 64k");
        var before = await BitmapsAsync(qmp);
        (await ImageBitmapsAsync()).Should().BeEmpty("new bitmaps reach the image at a clean close");
        await QuitAsync(d, qmp);

        (await ImageBitmapsAsync()).Should().BeEquivalentTo(new Dictionary<string, string> { ["pa"] = "auto", ["p4k"] = "auto", ["pd"] = "" });
        await CheckCleanAsync();

        (d, qmp) = await StartAsync();
        var after = await BitmapsAsync(qmp);
        after.Keys.Should().BeEquivalentTo(["pa", "p4k", "pd"]);
        foreach (var name in after.Keys)
        {
            after[name].Should().Be(before[name], name);
        }
        (await ImageBitmapsAsync()).Values.Should().OnlyContain(f => f.Contains("in-use", StringComparison.Ordinal));
        await WriteAsync(d, "write 20M 64k");
        (await BitmapsAsync(qmp))["pa"].Count.Should().Be(before["pa"].Count + 65536);

        // SIGTERM stores as quit does.
        var sha = (await BitmapsAsync(qmp))["pa"].Sha;
        d.Signal(15);
        (await d.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0, d.Stderr);
        await qmp.DisposeAsync();
        await d.DisposeAsync();
        await CheckCleanAsync();
        (d, qmp) = await StartAsync();
        (await BitmapsAsync(qmp))["pa"].Sha.Should().Be(sha);
        await QuitAsync(d, qmp);
        await CheckCleanAsync();
    }

    [Fact]
    public async Task Bitmaps_move_to_qemu_img_and_qemu_storage_daemon_and_back_with_the_same_hash()
    {
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Disk, "64M");
        var (d, qmp) = await StartAsync();
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "pa", persistent = true });
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "pd", persistent = true, disabled = true });
        await WriteAsync(d, "write -P 1 0 100k");
        await WriteAsync(d, "write 60M 3M");
        var ours = await BitmapsAsync(qmp);
        await QuitAsync(d, qmp);

        // qemu-img changes what backupd stored.
        await RunAsync("qemu-img", "bitmap", "--add", "-g", "65536", Disk, "qa");
        await RunAsync("qemu-img", "bitmap", "--merge", "pa", Disk, "qa");
        await RunAsync("qemu-img", "bitmap", "--disable", Disk, "pa");
        await RunAsync("qemu-img", "bitmap", "--enable", Disk, "pd");
        await RunAsync("qemu-img", "bitmap", "--add", Disk, "gone");
        await RunAsync("qemu-img", "bitmap", "--remove", Disk, "gone");
        (await ImageBitmapsAsync()).Should().BeEquivalentTo(new Dictionary<string, string> { ["pa"] = "", ["pd"] = "auto", ["qa"] = "auto" });
        await CheckCleanAsync();

        // qemu-storage-daemon loads them with the same bits, records, and stores a bitmap of its own.
        (d, qmp) = await StartAsync(qsd: true);
        var qsd = await BitmapsAsync(qmp);
        qsd["pa"].Sha.Should().Be(ours["pa"].Sha);
        qsd["qa"].Sha.Should().Be(ours["pa"].Sha);
        qsd["pd"].Should().Be((true, 0L, false, ours["pd"].Sha));
        await WriteAsync(d, "write 10M 64k");
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "q2", persistent = true, granularity = 4096 });
        await WriteAsync(d, "write 20M 5k");
        qsd = await BitmapsAsync(qmp);
        await QuitAsync(d, qmp);
        await CheckCleanAsync();

        // Back in backupd: everything QSD stored, the same.
        (d, qmp) = await StartAsync();
        (await BitmapsAsync(qmp)).Should().BeEquivalentTo(qsd);
        await OkAsync(qmp, "block-dirty-bitmap-remove", new { node = "drive0", name = "qa" });
        (await ImageBitmapsAsync()).Keys.Should().BeEquivalentTo(["pa", "pd", "q2"], "remove deletes a stored bitmap at once");
        await CheckCleanAsync();
        await QuitAsync(d, qmp);
        await CheckCleanAsync();

        // And once more to QSD after backupd rewrote them.
        (d, qmp) = await StartAsync(qsd: true);
        var again = await BitmapsAsync(qmp);
        again.Keys.Should().BeEquivalentTo(["pa", "pd", "q2"]);
        foreach (var name in again.Keys)
        {
            again[name].Should().Be(qsd[name], name);
        }
        await QuitAsync(d, qmp);
    }

    [Fact]
    public async Task After_kill_9_stored_bitmaps_are_inconsistent_unusable_and_removable()
    {
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Disk, "64M");
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_images, "t.qcow2"), "64M");
        var (d, qmp) = await StartAsync();
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "pb", persistent = true });
        await WriteAsync(d, "write -P 0x21 0 4M");
        await QuitAsync(d, qmp);

        (d, qmp) = await StartAsync();
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "fresh", persistent = true });
        // Guest writes keep going while the daemon dies.
        var writer = Process.Start(new ProcessStartInfo("qemu-io")
        {
            ArgumentList = { "-f", "raw", DriveDaemon.NbdUri(d), "-c", "write -P 0x22 8M 32M" },
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        })!;
        await Task.Delay(300);
        d.Signal(9);
        await d.WaitForExitAsync(TimeSpan.FromSeconds(30));
        await writer.WaitForExitAsync();
        writer.Dispose();
        await qmp.DisposeAsync();
        await d.DisposeAsync();

        (await ImageBitmapsAsync()).Should().BeEquivalentTo(new Dictionary<string, string> { ["pb"] = "auto,in-use" },
            "a bitmap created since the last clean close vanishes");
        // A write cut off before its flush may leak the clusters reserved for it (QEMU's can too), never corrupt.
        var check = Process.Start(new ProcessStartInfo("qemu-img") { ArgumentList = { "check", Disk }, RedirectStandardOutput = true })!;
        var report = await check.StandardOutput.ReadToEndAsync();
        await check.WaitForExitAsync();
        check.ExitCode.Should().BeOneOf([0, 3], report);
        check.Dispose();
        await RunAsync("qemu-img", "check", "-q", "-r", "leaks", Disk);
        await CheckCleanAsync();

        (d, qmp) = await StartAsync();
        var bitmaps = await BitmapsAsync(qmp);
        bitmaps.Keys.Should().Equal("pb");
        bitmaps["pb"].Should().Be((false, 0L, true, "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"));
        const string Inconsistent = "Bitmap 'pb' is inconsistent and cannot be used";
        await OkAsync(qmp, "blockdev-add", new Dictionary<string, object>
        {
            ["driver"] = "qcow2", ["node-name"] = "tgt",
            ["file"] = new Dictionary<string, object> { ["driver"] = "file", ["filename"] = Path.Combine(_images, "t.qcow2") },
        });
        (await ErrorAsync(qmp, "blockdev-backup", new Dictionary<string, object>
        {
            ["job-id"] = "j1", ["device"] = "drive0", ["target"] = "tgt", ["sync"] = "incremental", ["bitmap"] = "pb",
        })).Should().Be(Inconsistent);
        (await ErrorAsync(qmp, "block-dirty-bitmap-clear", new { node = "drive0", name = "pb" })).Should().Be(Inconsistent);
        (await ErrorAsync(qmp, "block-dirty-bitmap-enable", new { node = "drive0", name = "pb" })).Should().Be(Inconsistent);
        (await ErrorAsync(qmp, "block-dirty-bitmap-disable", new { node = "drive0", name = "pb" })).Should().Be(Inconsistent);
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "drive0", name = "t0" });
        (await ErrorAsync(qmp, "block-dirty-bitmap-merge", new { node = "drive0", target = "t0", bitmaps = new[] { "pb" } })).Should().Be(Inconsistent);
        (await ErrorAsync(qmp, "block-dirty-bitmap-merge", new { node = "drive0", target = "pb", bitmaps = new[] { "t0" } })).Should().Be(Inconsistent);
        (await ErrorAsync(qmp, "block-export-add", new Dictionary<string, object>
        {
            ["type"] = "nbd", ["id"] = "e1", ["node-name"] = "drive0", ["name"] = "e1", ["bitmaps"] = new[] { "pb" },
        })).Should().Be(Inconsistent);

        await OkAsync(qmp, "block-dirty-bitmap-remove", new { node = "drive0", name = "pb" });
        (await ImageBitmapsAsync()).Should().BeEmpty();
        await CheckCleanAsync();
        await QuitAsync(d, qmp);
        await CheckCleanAsync();
    }

    [Fact]
    public async Task Blockdev_del_stores_and_a_raw_node_cannot_hold_persistent_bitmaps()
    {
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Disk, "64M");
        var raw = Path.Combine(_images, "r.img");
        await RunAsync("qemu-img", "create", "-q", "-f", "raw", raw, "64M");
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_images, "o.qcow2"), "1M");
        var (d, qmp) = await StartAsync();
        await OkAsync(qmp, "blockdev-add", new Dictionary<string, object>
        {
            ["driver"] = "raw", ["node-name"] = "r0",
            ["file"] = new Dictionary<string, object> { ["driver"] = "file", ["filename"] = raw },
        });
        (await ErrorAsync(qmp, "block-dirty-bitmap-add", new { node = "r0", name = "x", persistent = true }))
            .Should().Be("Can't store persistent bitmaps to r0: Operation not supported");

        await OkAsync(qmp, "blockdev-add", new Dictionary<string, object>
        {
            ["driver"] = "qcow2", ["node-name"] = "other",
            ["file"] = new Dictionary<string, object> { ["driver"] = "file", ["filename"] = Path.Combine(_images, "o.qcow2") },
        });
        await OkAsync(qmp, "block-dirty-bitmap-add", new { node = "other", name = "kept", persistent = true });
        await OkAsync(qmp, "blockdev-del", new Dictionary<string, object> { ["node-name"] = "other" });
        var info = JsonNode.Parse(await RunAsync("qemu-img", "info", "--output=json", Path.Combine(_images, "o.qcow2")))!;
        info["format-specific"]!["data"]!["bitmaps"]![0]!["name"]!.GetValue<string>().Should().Be("kept");
        await QuitAsync(d, qmp);
    }
}
