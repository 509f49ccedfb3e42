using System.Net.Sockets;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

public class DaemonLifecycleTests
{
    private static string Disk(string dir, string name = "d.img", long size = 64 << 20)
    {
        var path = Path.Combine(dir, name);
        using var f = File.Create(path);
        f.SetLength(size);
        return path;
    }

    [Theory]
    [InlineData("--bogus", "backupd: unrecognized option '--bogus'")]
    [InlineData("--blockdev|node-name=x", "backupd: --blockdev node-name=x: Parameter 'driver' is missing")]
    [InlineData("--blockdev|driver=nosuch,node-name=x", "backupd: --blockdev driver=nosuch,node-name=x: Parameter 'driver' does not accept value 'nosuch'")]
    [InlineData("--blockdev|driver=file,node-name=f,filename=/nonexistent/x.img", "backupd: --blockdev driver=file,node-name=f,filename=/nonexistent/x.img: Could not open '/nonexistent/x.img': No such file or directory")]
    [InlineData("--blockdev|{bad", "backupd: --blockdev {bad: JSON parse error")]
    [InlineData("--monitor|chardev=nosuch", "backupd: --monitor chardev=nosuch: chardev \"nosuch\" not found")]
    [InlineData("--object|bogus,id=x", "backupd: --object bogus,id=x: Parameter 'qom-type' does not accept value 'bogus'")]
    [InlineData("--blockdev", "backupd: option '--blockdev' requires an argument")]
    [InlineData("--qmp|udp:1", "backupd: --qmp udp:1: expected 'unix:PATH' or 'tcp:HOST:PORT'")]
    public async Task A_bad_option_is_one_line_and_exit_status_1(string args, string expected)
    {
        var (code, stdout, stderr) = await DaemonProcess.RunAsync(args.Split('|'));
        code.Should().Be(1);
        stdout.Should().BeEmpty();
        var lines = stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        lines.Should().ContainSingle().Which.Should().StartWith(expected);
    }

    [Fact]
    public async Task Help_and_version_exit_0()
    {
        var help = await DaemonProcess.RunAsync(["--help"]);
        help.ExitCode.Should().Be(0);
        help.Stdout.Should().Contain("--blockdev").And.Contain("--chardev").And.Contain("--monitor").And.Contain("--qmp");
        var version = await DaemonProcess.RunAsync(["-V"]);
        version.ExitCode.Should().Be(0);
        version.Stdout.Should().StartWith("backupd version ");
    }

    [Fact]
    public async Task Quit_answers_then_closes_every_node_and_removes_socket_and_pidfile()
    {
        var dir = DaemonProcess.NewDirectory();
        Disk(dir);
        var pid = Path.Combine(dir, "d.pid");
        await using var d = await DaemonProcess.StartAsync(["--blockdev", "driver=raw,node-name=drive0,file.driver=file,file.filename=d.img", "--pidfile", pid], dir);
        (await File.ReadAllTextAsync(pid)).Trim().Should().Be(d.Pid.ToString(System.Globalization.CultureInfo.InvariantCulture));
        await using var qmp = await d.ConnectAsync();
        await using var other = await d.ConnectAsync();
        (await qmp.ExecuteAsync("quit")).Should().ContainKey("return");
        (await d.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);
        File.Exists(d.QmpSocket).Should().BeFalse();
        File.Exists(pid).Should().BeFalse();
        (await other.IsClosedAsync(TimeSpan.FromSeconds(5))).Should().BeTrue();
    }

    [Theory]
    [InlineData(15)]
    [InlineData(2)]
    public async Task Sigterm_and_sigint_shut_down_cleanly(int signal)
    {
        var dir = DaemonProcess.NewDirectory();
        Disk(dir);
        await using var d = await DaemonProcess.StartAsync(["--blockdev", "driver=file,node-name=file0,filename=d.img"], dir);
        await using var qmp = await d.ConnectAsync();
        d.Signal(signal);
        var code = await d.WaitForExitAsync(TimeSpan.FromSeconds(30));
        await Task.Delay(200); // stderr is collected asynchronously
        code.Should().Be(0, d.Stderr);
        File.Exists(d.QmpSocket).Should().BeFalse();
        d.Stderr.Should().NotContain("[ERR]").And.NotContain("Unhandled");
    }

    [Fact]
    public async Task A_signal_the_moment_the_socket_appears_is_a_clean_stop()
    {
        // The socket exists before the host has started; a signal in that window once crashed the daemon.
        var dir = DaemonProcess.NewDirectory();
        Disk(dir);
        await using var d = await DaemonProcess.StartAsync(["--blockdev", "driver=file,node-name=file0,filename=d.img"], dir);
        d.Signal(15);
        var code = await d.WaitForExitAsync(TimeSpan.FromSeconds(30));
        await Task.Delay(200); // stderr is collected asynchronously
        code.Should().Be(0, d.Stderr);
        File.Exists(d.QmpSocket).Should().BeFalse();
    }

    [Fact]
    public async Task Several_monitors_tcp_and_config_file_serve_the_same_daemon()
    {
        var dir = DaemonProcess.NewDirectory();
        Disk(dir);
        var second = Path.Combine(dir, "second.sock");
        var config = Path.Combine(dir, "config.json");
        await File.WriteAllTextAsync(config, new JsonObject
        {
            ["blockdev"] = new JsonArray(new JsonObject { ["driver"] = "file", ["node-name"] = "file0", ["filename"] = Path.Combine(dir, "d.img") }),
            ["qmp"] = new JsonArray($"unix:{second}", "tcp:127.0.0.1:0"),
        }.ToJsonString());
        await using var d = await DaemonProcess.StartAsync(["--config", config, "--log-level", "debug"], dir);
        await using var a = await d.ConnectAsync();
        // The listeners are bound one after another; the test waited only for the first.
        for (var i = 0; i < 500 && !File.Exists(second); i++)
        {
            await Task.Delay(20);
        }
        await using var b = await QmpClient.ConnectAsync(second);
        (await a.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray().Should().ContainSingle();
        (await b.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray().Should().ContainSingle();
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (!d.Stderr.Contains("QMP listening on tcp:127.0.0.1:", StringComparison.Ordinal) && DateTime.UtcNow < deadline)
        {
            await Task.Delay(20); // stderr is collected asynchronously
        }
        d.Stderr.Should().Contain("QMP listening on tcp:127.0.0.1:");
    }

    [Fact]
    public async Task With_no_options_it_runs_on_a_demo_disk_and_prints_its_socket()
    {
        var dir = DaemonProcess.NewDirectory();
        var state = Path.Combine(dir, "state");
        await using var d = await DaemonProcess.StartAsync([], dir, addMonitor: false, env: new Dictionary<string, string> { ["BACKUPD_STATE_DIR"] = state });
        var socket = Path.Combine(state, "qmp.sock");
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (!d.Stdout.Contains(socket, StringComparison.Ordinal) && DateTime.UtcNow < deadline)
        {
            await Task.Delay(50);
        }
        d.Stdout.Should().Contain($"backupd: QMP socket {socket}");
        await using var qmp = await QmpClient.ConnectAsync(socket);
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        nodes.Select(n => n!["node-name"]!.GetValue<string>()).Should().Contain(["drive0", "drive1"]);
        File.Exists(Path.Combine(state, "demo.img")).Should().BeTrue();
        File.Exists(Path.Combine(state, "demo1.img")).Should().BeTrue();
        d.Stdout.Should().Contain($"backupd: demo disk {Path.Combine(state, "demo1.img")} is node 'drive1'");
    }

    [Fact]
    public async Task Daemonize_returns_once_the_daemon_serves_qmp()
    {
        var dir = DaemonProcess.NewDirectory();
        var socket = Path.Combine(dir, "qmp.sock");
        var pid = Path.Combine(dir, "d.pid");
        var (code, _, stderr) = await DaemonProcess.RunAsync(["--daemonize", "--pidfile", pid, "--qmp", "unix:" + socket], dir);
        code.Should().Be(0, stderr);
        File.Exists(socket).Should().BeTrue("the parent exits only when the child is ready");
        await using (var qmp = await QmpClient.ConnectAsync(socket))
        {
            (await qmp.ExecuteAsync("quit")).Should().ContainKey("return");
        }
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (File.Exists(pid) && DateTime.UtcNow < deadline)
        {
            await Task.Delay(50);
        }
        File.Exists(pid).Should().BeFalse();
        Directory.Delete(dir, recursive: true);
    }

    [Fact]
    public async Task A_client_that_hangs_up_mid_message_does_not_disturb_the_daemon()
    {
        var dir = DaemonProcess.NewDirectory();
        await using var d = await DaemonProcess.StartAsync([], dir);
        using (var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            await s.ConnectAsync(new UnixDomainSocketEndPoint(d.QmpSocket));
            await s.SendAsync("{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-ver"u8.ToArray());
        }
        await using var qmp = await d.ConnectAsync();
        (await qmp.ExecuteAsync("query-version"))["return"]!["package"]!.GetValue<string>().Should().StartWith("backupd ");
    }
}
