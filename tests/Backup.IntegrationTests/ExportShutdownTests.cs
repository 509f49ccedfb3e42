using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Exports at the daemon's end and right after a client dies, as qemu-storage-daemon 7.2 does (checked
/// live): quit and SIGTERM close every export first, each with BLOCK_EXPORT_DELETED in the order the
/// exports were added, and quit's reply comes after those events; no SHUTDOWN event.
/// </summary>
public class ExportShutdownTests
{
    private static async Task<(DaemonProcess Daemon, string Nbd)> StartWithExportsAsync()
    {
        var dir = DaemonProcess.NewDirectory();
        var disk = Path.Combine(dir, "d.img");
        await using (var f = File.Create(disk))
        {
            f.SetLength(64 << 20);
        }
        var nbd = Path.Combine(dir, "nbd.sock");
        var daemon = await DaemonProcess.StartAsync([
            "--blockdev", $"driver=file,node-name=f0,filename={disk}",
            "--blockdev", "driver=raw,node-name=r0,file=f0",
            "--nbd-server", $"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=e1,node-name=r0,name=a",
        ], dir);
        return (daemon, nbd);
    }

    /// <summary>Every line the daemon sends after the commands, in order, until it closes the connection.</summary>
    private static async Task<List<string>> TranscriptAsync(DaemonProcess daemon, Func<Task> afterSetup, params string[] commands)
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(daemon.QmpSocket));
        await using var stream = new NetworkStream(socket);
        using var reader = new StreamReader(stream, Encoding.UTF8);
        await reader.ReadLineAsync();
        async Task SendAsync(string line)
        {
            await stream.WriteAsync(Encoding.UTF8.GetBytes(line + "\n"));
            (await reader.ReadLineAsync()).Should().Contain("\"return\"", line);
        }
        await SendAsync("""{"execute":"qmp_capabilities"}""");
        await SendAsync("""{"execute":"block-export-add","arguments":{"type":"nbd","id":"e2","node-name":"r0","name":"b"}}""");
        await SendAsync("""{"execute":"block-export-add","arguments":{"type":"nbd","id":"e3","node-name":"f0","name":"c"}}""");
        foreach (var c in commands)
        {
            await stream.WriteAsync(Encoding.UTF8.GetBytes(c + "\n"));
        }
        await afterSetup();
        var lines = new List<string>();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        try
        {
            while (await reader.ReadLineAsync(cts.Token) is { } line)
            {
                var msg = JsonNode.Parse(line)!.AsObject();
                lines.Add(msg["event"] is { } e ? $"{e} {msg["data"]?.ToJsonString()}" : msg.ToJsonString());
            }
        }
        catch (IOException)
        {
            // QSD resets the connection at exit; either end is the end.
        }
        return lines;
    }

    [Fact]
    public async Task Quit_closes_every_export_with_its_event_before_the_reply()
    {
        var (daemon, _) = await StartWithExportsAsync();
        await using var _ = daemon;
        var lines = await TranscriptAsync(daemon, () => Task.CompletedTask, """{"execute":"quit"}""");
        lines.Should().Equal(
            """BLOCK_EXPORT_DELETED {"id":"e1"}""",
            """BLOCK_EXPORT_DELETED {"id":"e2"}""",
            """BLOCK_EXPORT_DELETED {"id":"e3"}""",
            """{"return":{}}""");
        (await daemon.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);
    }

    [Fact]
    public async Task Sigterm_closes_every_export_with_its_event_before_the_connection_ends()
    {
        var (daemon, _) = await StartWithExportsAsync();
        await using var _ = daemon;
        var lines = await TranscriptAsync(daemon, () => { daemon.Signal(15); return Task.CompletedTask; });
        lines.Should().Equal(
            """BLOCK_EXPORT_DELETED {"id":"e1"}""",
            """BLOCK_EXPORT_DELETED {"id":"e2"}""",
            """BLOCK_EXPORT_DELETED {"id":"e3"}""");
        (await daemon.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);
    }

    /// <summary>qemu-io on the export, one command done, left running as a connected client.</summary>
    private static async Task<Process> ConnectedQemuIoAsync(string nbd, string export, string command, bool readOnly)
    {
        var psi = new ProcessStartInfo("qemu-io") { RedirectStandardInput = true, RedirectStandardOutput = true, UseShellExecute = false };
        foreach (var a in (string[])[.. readOnly ? ["-r"] : Array.Empty<string>(), "-f", "raw", $"nbd+unix:///{export}?socket={nbd}"])
        {
            psi.ArgumentList.Add(a);
        }
        var p = Process.Start(psi)!;
        await p.StandardInput.WriteLineAsync(command);
        await p.StandardInput.FlushAsync();
        // "qemu-io> wrote ..." and the statistics line: the command has been answered over NBD.
        (await p.StandardOutput.ReadLineAsync()).Should().Contain(" bytes at offset ");
        await p.StandardOutput.ReadLineAsync();
        return p;
    }

    [Fact]
    public async Task A_safe_block_export_del_right_after_the_client_was_killed_succeeds_every_time()
    {
        var (daemon, nbd) = await StartWithExportsAsync();
        await using var _ = daemon;
        await using var qmp = await daemon.ConnectAsync();
        (await qmp.ExecuteAsync("block-export-del", new { id = "e1" })).Should().ContainKey("return");
        (await qmp.NextEventAsync())["event"]!.GetValue<string>().Should().Be("BLOCK_EXPORT_DELETED");
        for (var round = 0; round < 50; round++)
        {
            (await qmp.ExecuteAsync("block-export-add", new JsonObject
            {
                ["type"] = "nbd", ["id"] = "x", ["node-name"] = "r0", ["name"] = "x", ["writable"] = true,
            })).Should().ContainKey("return");
            using (var client = await ConnectedQemuIoAsync(nbd, "x", "write -P 0x11 0 64k", readOnly: false))
            {
                client.Kill();
                await client.WaitForExitAsync();
            }
            var reply = await qmp.ExecuteAsync("block-export-del", new { id = "x" });
            reply.Should().ContainKey("return", $"round {round}: {reply.ToJsonString()}");
            var deleted = await qmp.NextEventAsync();
            deleted.ToJsonString().Should().Contain("BLOCK_EXPORT_DELETED").And.Contain("\"x\"");
        }
    }

    [Fact]
    public async Task A_safe_block_export_del_with_a_client_connected_fails_and_hard_disconnects_it()
    {
        var (daemon, nbd) = await StartWithExportsAsync();
        await using var _ = daemon;
        await using var qmp = await daemon.ConnectAsync();
        using var client = await ConnectedQemuIoAsync(nbd, "a", "read 0 512", readOnly: true);
        try
        {
            var reply = await qmp.ExecuteAsync("block-export-del", new { id = "e1" });
            reply["error"]!["class"]!.GetValue<string>().Should().Be("GenericError");
            reply["error"]!["desc"]!.GetValue<string>().Should().Be("export 'e1' still in use");
            (await qmp.ExecuteAsync("query-block-exports"))["return"]!.AsArray().Should().HaveCount(1);
            (await qmp.ExecuteAsync("block-export-del", new { id = "e1", mode = "hard" })).Should().ContainKey("return");
            (await qmp.NextEventAsync())["data"]!.ToJsonString().Should().Be("""{"id":"e1"}""");
        }
        finally
        {
            client.Kill();
            await client.WaitForExitAsync();
        }
    }
}
