using System.Diagnostics;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Every number and option form of qemu-io, sent through human-monitor-command to the real daemon, then
/// read back by an independent reader: the real qemu-io over the daemon's NBD export. The reply and the
/// daemon's stdout are checked against what QEMU 7.2 gives for the same line.
/// </summary>
public sealed class QemuIoFormTests : IAsyncLifetime
{
    private string _dir = "";
    private DaemonProcess? _daemon;
    private QmpClient? _qmp;

    private QmpClient Qmp => _qmp!;

    private string Uri => $"nbd+unix:///drive0?socket={Path.Combine(_dir, "nbd.sock")}";

    public async Task InitializeAsync()
    {
        _dir = DaemonProcess.NewDirectory();
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", Path.Combine(_dir, "disk.img"), "2G");
        _daemon = await DaemonProcess.StartAsync(
        [
            "--blockdev", "driver=file,node-name=file0,filename=disk.img",
            "--blockdev", "driver=raw,node-name=drive0,file=file0",
            "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(_dir, "nbd.sock")}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on",
        ], _dir);
        _qmp = await _daemon.ConnectAsync();
    }

    public Task DisposeAsync() => DaemonProcess.ShutdownAsync(_qmp, _daemon);

    private static async Task<string> HmpAsync(QmpClient qmp, string line)
    {
        var reply = await qmp.ExecuteAsync("human-monitor-command", Hmp(line));
        reply.Should().ContainKey("return", reply.ToJsonString());
        return reply["return"]!.GetValue<string>();
    }

    /// <summary>The independent reader: qemu-io over NBD, failing the test on a pattern mismatch.</summary>
    private async Task ExpectBytesAsync(byte pattern, long offset, long length)
    {
        var output = await Tool.RunAsync("qemu-io", "-f", "raw", "-r", Uri, "-c", $"read -q -P 0x{pattern:x2} {offset} {length}");
        output.Should().NotContain("Pattern verification failed", $"{length} bytes at {offset} should be 0x{pattern:x2}");
    }

    [Theory]
    [InlineData("write -P 0xbb 0 512", 0L, 512L, 0xbb, "wrote 512/512 bytes at offset 0")]
    [InlineData("write -P 0xab 0x1b 0x1e", 27L, 30L, 0xab, "wrote 30/30 bytes at offset 27")]
    [InlineData("write -P 0x6e 0 512", 0L, 512L, 0x6e, "wrote 512/512 bytes at offset 0")]
    [InlineData("write -P0x49 512 512", 512L, 512L, 0x49, "wrote 512/512 bytes at offset 512")]
    [InlineData("write -qP 0x11 1k 1k", 1024L, 1024L, 0x11, null)]
    [InlineData("write -q -P 0x5e -- 0x1e 0xe", 30L, 14L, 0x5e, null)]
    [InlineData("write 8k 4k -P 0x3e", 8192L, 4096L, 0x3e, "wrote 4096/4096 bytes at offset 8192")]
    [InlineData("w -P 0x4b 64k 0x1bk", 65536L, 27648L, 0x4b, "wrote 27648/27648 bytes at offset 65536")]
    [InlineData("write -P 0x4d 1M 64k", 1L << 20, 65536L, 0x4d, "wrote 65536/65536 bytes at offset 1048576")]
    [InlineData("write -P 0x47 1G 0x1e", 1L << 30, 30L, 0x47, "wrote 30/30 bytes at offset 1073741824")]
    [InlineData("write -P 0x4d 1.5M 0.5k", 3L << 19, 512L, 0x4d, "wrote 512/512 bytes at offset 1572864")]
    [InlineData("write -P 010 3k 1", 3072L, 1L, 8, "wrote 1/1 bytes at offset 3072")]
    [InlineData("writev -P 0x21 16k 512 1k", 16384L, 1536L, 0x21, "wrote 1536/1536 bytes at offset 16384")]
    [InlineData("write -f -P 0x46 20k 4k", 20480L, 4096L, 0x46, "wrote 4096/4096 bytes at offset 20480")]
    public async Task A_form_writes_exactly_its_bytes(string command, long offset, long length, int pattern, string? report)
    {
        // A known background around the range: 0x01 a sector before and after it.
        var around = Math.Max(0, offset - 512);
        await Tool.RunAsync("qemu-io", "-f", "raw", Uri, "-c", $"write -q -P 0x01 {around} {offset - around + length + 512}");
        var before = _daemon!.Stdout.Length;

        var reply = await HmpAsync(Qmp, $"qemu-io drive0 \"{command}\"");

        reply.Should().Be(command.Contains("0x1bk", StringComparison.Ordinal)
            ? "warning: Using a multiplier suffix on hex numbers is deprecated: 0x1bk\r\n" : "");
        await ExpectBytesAsync((byte)pattern, offset, length);
        if (offset > around)
        {
            await ExpectBytesAsync(0x01, around, offset - around);
        }
        await ExpectBytesAsync(0x01, offset + length, 512);
        if (report is not null)
        {
            await WaitForStdoutAsync(before, report + "\n");
        }
    }

    [Fact]
    public async Task Zero_writes_aio_writes_and_discard_reach_the_image()
    {
        await Tool.RunAsync("qemu-io", "-f", "raw", Uri, "-c", "write -q -P 0x77 256k 64k");
        (await HmpAsync(Qmp, "qemu-io drive0 \"write -z 256k 4k\"")).Should().Be("");
        (await HmpAsync(Qmp, "qemu-io drive0 \"write -q -z -u 260k 4k\"")).Should().Be("");
        (await HmpAsync(Qmp, "qemu-io drive0 \"aio_write -P 0x61 264k 4k\"")).Should().Be("");
        (await HmpAsync(Qmp, "qemu-io drive0 \"aio_write -q -P 0x62 268k 2k 2k\"")).Should().Be("");
        (await HmpAsync(Qmp, "qemu-io drive0 \"aio_flush\"")).Should().Be("");
        await ExpectBytesAsync(0, 256 << 10, 8 << 10);
        await ExpectBytesAsync(0x61, 264 << 10, 4 << 10);
        await ExpectBytesAsync(0x62, 268 << 10, 4 << 10);
        await ExpectBytesAsync(0x77, 272 << 10, 48 << 10);
        (await HmpAsync(Qmp, "qemu-io drive0 \"read -P 0x61 264k 4k\"")).Should().Be("");
        (await HmpAsync(Qmp, "qemu-io drive0 \"read -P 0x62 264k 4k\"")).Should().Be("");
        await WaitForStdoutAsync(0, "Pattern verification failed at offset 270336, 4096 bytes\n");
    }

    [Fact]
    public async Task Refused_forms_write_nothing_and_say_so_where_QEMU_does()
    {
        await Tool.RunAsync("qemu-io", "-f", "raw", Uri, "-c", "write -q -P 0x01 0 64k");
        var before = _daemon!.Stdout.Length;
        foreach (var command in new[]
        {
            "write -P 0x100 0 512", "write -q 0 1.5", "write -q 0 8e", "write -x 0 512", "write -z -P 1 0 512",
            "write -q -- -1 1", "write -q 0 512x", "write 2G 512",
        })
        {
            (await HmpAsync(Qmp, $"qemu-io drive0 \"{command}\"")).Should().Be("");
        }
        await ExpectBytesAsync(0x01, 0, 64 << 10);
        await WaitForStdoutAsync(before,
            "0x100 is not a valid pattern byte\n" +
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1.5\n" +
            "Parsing error: argument too large -- 8e\n" +
            "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset\n" +
            "Only one of -z, -P, and -s can be specified at the same time\n" +
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -1\n" +
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 512x\n" +
            "write failed: Input/output error\n");
        _daemon.Stderr.Should().Contain("write: invalid option -- 'x'");
        // A protocol node could grow, but qemu-io's BlockBackend refuses requests past its end first.
        before = _daemon.Stdout.Length;
        (await HmpAsync(Qmp, "qemu-io file0 \"write 2G 512\"")).Should().Be("");
        await WaitForStdoutAsync(before, "write failed: Input/output error\n");
        new FileInfo(Path.Combine(_dir, "disk.img")).Length.Should().Be(2L << 30);
        (await HmpAsync(Qmp, "qemu-io nosuch \"write 0 512\"")).Should().Be("Error: Cannot find device='' nor node-name='nosuch'\r\n");
        (await HmpAsync(Qmp, "qemu-io drive0 write 0 512")).Should().Be(
            "qemu-io: extraneous characters at the end of line\r\nTry \"help qemu-io\" for more information\r\n");
        (await HmpAsync(Qmp, "info block")).Should().Be("unknown command: 'info'\r\n");
    }

    [Fact]
    public async Task A_long_qemu_io_command_does_not_hold_other_clients_commands_but_keeps_its_node()
    {
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", Path.Combine(_dir, "spare.img"), "1M");
        (await Qmp.ExecuteAsync("blockdev-add", new Dictionary<string, object>
        {
            ["driver"] = "file", ["node-name"] = "spare", ["filename"] = Path.Combine(_dir, "spare.img"),
        })).Should().ContainKey("return");
        await using var other = await _daemon!.ConnectAsync();
        var sleeping = HmpAsync(Qmp, "qemu-io spare \"sleep 3000\"");
        await Task.Delay(300);
        var sw = Stopwatch.StartNew();
        (await other.ExecuteAsync("query-version")).Should().ContainKey("return");
        (await other.ExecuteAsync("human-monitor-command", Hmp("qemu-io drive0 \"write -q 0 512\""))).Should().ContainKey("return");
        sw.Elapsed.Should().BeLessThan(TimeSpan.FromSeconds(2), "the sleeping command left the QMP command lock");
        sleeping.IsCompleted.Should().BeFalse();
        var del = await other.ExecuteAsync("blockdev-del", new Dictionary<string, object> { ["node-name"] = "spare" });
        del["error"]!["desc"]!.GetValue<string>().Should().Be("Node 'spare' is busy: node is used by a qemu-io command");
        (await sleeping).Should().Be("");
        (await Qmp.ExecuteAsync("blockdev-del", new Dictionary<string, object> { ["node-name"] = "spare" })).Should().ContainKey("return");
    }

    private static Dictionary<string, object> Hmp(string line) => new() { ["command-line"] = line };

    private async Task WaitForStdoutAsync(int from, string expected)
    {
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (!_daemon!.Stdout[from..].Contains(expected, StringComparison.Ordinal) && DateTime.UtcNow < deadline)
        {
            await Task.Delay(20);
        }
        _daemon.Stdout[from..].Should().Contain(expected);
    }
}
