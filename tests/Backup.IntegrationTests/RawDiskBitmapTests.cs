using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// A raw disk gets persistent bitmaps the way QEMU gives them: a qcow2 metadata image whose external data
/// file is the raw disk (data-file-raw). The bitmap survives a restart, and the raw file stays a plain
/// raw disk that any tool reads as the guest wrote it.
/// </summary>
public sealed class RawDiskBitmapTests : IAsyncLifetime
{
    private const int MiB = 1 << 20;
    private readonly string _dir = DaemonProcess.NewDirectory();
    private readonly List<DaemonProcess> _daemons = [];

    private string Raw => Path.Combine(_dir, "disk.raw");

    private string Meta => Path.Combine(_dir, "meta.qcow2");

    public Task InitializeAsync() =>
        Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", "-o", $"data_file={Raw},data_file_raw=on", Meta, "64M");

    public async Task DisposeAsync()
    {
        foreach (var d in _daemons)
        {
            await d.DisposeAsync();
        }
        Directory.Delete(_dir, recursive: true);
    }

    private async Task<(DaemonProcess Daemon, QmpClient Qmp)> StartAsync()
    {
        var (daemon, qmp) = await DriveDaemon.StartAsync(Meta);
        _daemons.Add(daemon);
        return (daemon, qmp);
    }

    private static Task<string> WriteAsync(string image, string format, string command) => Tool.RunAsync("qemu-io", "-f", format, image, "-c", command);

    private static async Task<string> Sha256Async(QmpClient qmp) =>
        (await qmp.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new { node = "drive0", name = "b0" }))["return"]!["sha256"]!.GetValue<string>();

    [Fact]
    public async Task The_bitmap_survives_a_restart_and_the_raw_file_stays_plain_raw()
    {
        var (daemon, qmp) = await StartAsync();
        (await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0", persistent = true })).Should().ContainKey("return");
        var nbd = DriveDaemon.NbdUri(daemon);
        var model = Path.Combine(_dir, "model.raw");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", model, "64M");
        foreach (var command in new[] { "write -P 0x11 0 1M", "write -P 0x22 10M 64k", "write -P 0x33 63M 1M" })
        {
            await WriteAsync(nbd, "raw", command);
            await WriteAsync(model, "raw", command);
        }
        var sha = await Sha256Async(qmp);
        await qmp.ExecuteAsync("quit");
        await daemon.WaitForExitAsync(TimeSpan.FromSeconds(20));

        // Plain raw: byte for byte what the guest wrote, readable with no qcow2 in sight.
        await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", Raw, model);
        new FileInfo(Raw).Length.Should().Be(64 * MiB);
        (await Tool.RunAsync("qemu-img", "info", Meta)).Should().Contain("b0");
        await Tool.RunAsync("qemu-img", "check", Meta);

        (daemon, qmp) = await StartAsync();
        (await Sha256Async(qmp)).Should().Be(sha);
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        var b0 = nodes.First(n => n!["node-name"]!.GetValue<string>() == "drive0")!["dirty-bitmaps"]!.AsArray().Single()!;
        b0["count"]!.GetValue<long>().Should().Be(2 * MiB + 64 * 1024);
        b0["recording"]!.GetValue<bool>().Should().BeTrue();
    }
}
