using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Crash-consistent bitmaps (our extension), end to end: the daemon is killed with -9 in the middle of
/// guest writes, and the bitmap it stored still covers every change, so an incremental backup taken after
/// the restart equals the disk as the crash left it. A plain persistent bitmap next to it comes back
/// inconsistent, as in QEMU.
/// </summary>
public sealed class CrashConsistentBitmapTests : IAsyncLifetime
{
    private const int MiB = 1 << 20;
    private readonly string _images = DaemonProcess.NewDirectory();
    private readonly List<DaemonProcess> _daemons = [];

    private string Disk => Path.Combine(_images, "disk.qcow2");

    public Task InitializeAsync() => Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Disk, "64M");

    public async Task DisposeAsync()
    {
        foreach (var d in _daemons)
        {
            await d.DisposeAsync();
        }
        Directory.Delete(_images, recursive: true);
    }

    private async Task<(DaemonProcess Daemon, QmpClient Qmp)> StartAsync()
    {
        var (daemon, qmp) = await DriveDaemon.StartAsync(Disk);
        _daemons.Add(daemon);
        return (daemon, qmp);
    }

    private static async Task<JsonObject?> BitmapAsync(QmpClient qmp, string name)
    {
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        var node = nodes.First(n => n!["node-name"]!.GetValue<string>() == "drive0")!;
        return node["dirty-bitmaps"]?.AsArray().FirstOrDefault(b => b!["name"]?.GetValue<string>() == name)?.AsObject();
    }

    private static async Task WaitJobAsync(QmpClient qmp, string id)
    {
        while (true)
        {
            var e = await qmp.NextEventAsync(TimeSpan.FromSeconds(60));
            if (e["event"]!.GetValue<string>() == "BLOCK_JOB_COMPLETED" && e["data"]!["device"]!.GetValue<string>() == id)
            {
                e["data"]!["error"].Should().BeNull();
                return;
            }
        }
    }

    [Fact]
    public async Task After_kill_9_during_writes_an_incremental_from_the_bitmap_equals_the_disk()
    {
        var (daemon, qmp) = await StartAsync();
        await Tool.RunAsync("qemu-io", "-f", "raw", DriveDaemon.NbdUri(daemon), "-c", "write -P 0x11 0 16M");
        // The plain persistent bitmap must have been stored once to come back at all (QEMU's rule).
        (await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "drive0", name = "plain", persistent = true })).Should().ContainKey("return");
        await qmp.ExecuteAsync("quit");
        await daemon.WaitForExitAsync(TimeSpan.FromSeconds(20));

        (daemon, qmp) = await StartAsync();
        var full = Path.Combine(_images, "full.qcow2");
        var reply = await qmp.ExecuteAsync("transaction", JsonNode.Parse($$$"""
            {"actions": [
              {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "cc", "persistent": true, "crash-consistent": true}},
              {"type": "drive-backup", "data": {"job-id": "full", "device": "drive0", "sync": "full", "target": "{{{full}}}", "format": "qcow2"}}
            ]}
            """));
        reply.Should().ContainKey("return");
        await WaitJobAsync(qmp, "full");
        (await BitmapAsync(qmp, "cc"))!["crash-consistent"]!.GetValue<bool>().Should().BeTrue();

        // Random writes, each acknowledged, until the daemon dies under them.
        await using var nbd = await NbdConnection.OpenAsync(DriveDaemon.NbdSocket(daemon), "drive0");
        var rng = new Random(124);
        var block = new byte[64 * 1024];
        var acknowledged = 0;
        var writer = Task.Run(async () =>
        {
            try
            {
                while (true)
                {
                    rng.NextBytes(block);
                    var length = rng.Next(1, 17) * 4096;
                    await nbd.WriteAsync(rng.NextInt64(0, (64 * MiB - length) / 512) * 512, block.AsMemory(0, length));
                    Interlocked.Increment(ref acknowledged);
                }
            }
            catch (IOException)
            {
                // The daemon was killed.
            }
            catch (System.Net.Sockets.SocketException)
            {
            }
        });
        while (Volatile.Read(ref acknowledged) < 400)
        {
            await Task.Delay(10);
        }
        daemon.Signal(9);
        await daemon.WaitForExitAsync(TimeSpan.FromSeconds(20));
        await writer;

        // The image is sound (leaked clusters allowed, as after any crash) and the disk is what it is now.
        var check = await Tool.RunWithExitCodeAsync("qemu-img", "check", "-f", "qcow2", Disk);
        check.ExitCode.Should().BeOneOf([0, 3], check.Stdout + check.Stderr);
        // Not repaired: qemu-img opening it read-write would clear our autoclear bit, and with it the trust.
        var atCrash = Path.Combine(_images, "at-crash.raw");
        await Tool.RunAsync("qemu-img", "convert", "-f", "qcow2", "-O", "raw", Disk, atCrash);

        (daemon, qmp) = await StartAsync();
        var cc = (await BitmapAsync(qmp, "cc"))!;
        cc.ContainsKey("inconsistent").Should().BeFalse("a crash-consistent bitmap survives the crash");
        cc["recording"]!.GetValue<bool>().Should().BeTrue();
        cc["crash-consistent"]!.GetValue<bool>().Should().BeTrue();
        cc["count"]!.GetValue<long>().Should().BeGreaterThan(0);
        (await BitmapAsync(qmp, "plain"))!["inconsistent"]!.GetValue<bool>().Should().BeTrue("a plain persistent bitmap does not");

        var inc = Path.Combine(_images, "inc.qcow2");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "qcow2", inc);
        (await qmp.ExecuteAsync("drive-backup", new JsonObject
        {
            ["job-id"] = "inc", ["device"] = "drive0", ["sync"] = "incremental", ["bitmap"] = "cc",
            ["target"] = inc, ["format"] = "qcow2", ["mode"] = "existing",
        })).Should().ContainKey("return");
        await WaitJobAsync(qmp, "inc");
        await Tool.RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", inc, atCrash);
        (await BitmapAsync(qmp, "cc"))!["count"]!.GetValue<long>().Should().Be(0);

        // A clean quit stores it exactly; it stays crash-consistent across the restart.
        await Tool.RunAsync("qemu-io", "-f", "raw", DriveDaemon.NbdUri(daemon), "-c", "write -P 0x22 40M 64k");
        var sha = (await qmp.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new { node = "drive0", name = "cc" }))["return"]!["sha256"]!.GetValue<string>();
        await qmp.ExecuteAsync("quit");
        await daemon.WaitForExitAsync(TimeSpan.FromSeconds(20));
        var after = JsonNode.Parse((await Tool.RunWithExitCodeAsync("qemu-img", "check", "--output=json", "-f", "qcow2", Disk)).Stdout)!;
        after["corruptions"]?.GetValue<long>().Should().Be(0, "the clusters the crash leaked stay leaked, nothing worse");
        after["check-errors"]?.GetValue<long>().Should().Be(0);
        (daemon, qmp) = await StartAsync();
        (await BitmapAsync(qmp, "cc"))!["crash-consistent"]!.GetValue<bool>().Should().BeTrue();
        (await qmp.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new { node = "drive0", name = "cc" }))["return"]!["sha256"]!
            .GetValue<string>().Should().Be(sha);
    }

    [Fact]
    public async Task Crash_consistent_needs_a_persistent_bitmap_on_a_qcow2_node()
    {
        var (_, qmp) = await StartAsync();
        var reply = await qmp.ExecuteAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = "drive0", ["name"] = "t", ["crash-consistent"] = true });
        reply["error"]!["desc"]!.GetValue<string>().Should().Be("Bitmap 't' must be persistent to be crash-consistent");
        (await BitmapAsync(qmp, "t")).Should().BeNull();
    }
}
