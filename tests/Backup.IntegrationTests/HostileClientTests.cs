using System.Net.Sockets;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// The daemon under hostile load, black-box: a connection flood to its open-file limit, a thousand idle
/// NBD connections, malformed QMP on a live socket. Clients already connected keep being served, the
/// CPU stays idle while the daemon cannot accept, and new clients are served once the flood ends.
/// </summary>
public class HostileClientTests
{
    private static long CpuTicks(int pid)
    {
        var fields = File.ReadAllText($"/proc/{pid}/stat").Split(')')[1].Split(' ', StringSplitOptions.RemoveEmptyEntries);
        return long.Parse(fields[11]) + long.Parse(fields[12]);
    }

    private static List<Socket> Flood(string path, int count)
    {
        var sockets = new List<Socket>();
        for (var i = 0; i < count; i++)
        {
            var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { Blocking = false };
            try
            {
                s.Connect(new UnixDomainSocketEndPoint(path));
                sockets.Add(s);
            }
            catch (SocketException)
            {
                // Backlog full (EAGAIN): the daemon is not accepting, which is the point.
                s.Dispose();
            }
        }
        return sockets;
    }

    private static async Task<byte[]> NbdGreetingAsync(string path)
    {
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await s.ConnectAsync(new UnixDomainSocketEndPoint(path));
        var greeting = new byte[18];
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var got = 0;
        while (got < greeting.Length)
        {
            var n = await s.ReceiveAsync(greeting.AsMemory(got), SocketFlags.None, cts.Token);
            if (n == 0)
            {
                break;
            }
            got += n;
        }
        return greeting[..got];
    }

    /// <summary>Connects, waiting while the listen backlog is full (EAGAIN) until the daemon has accepted the clients before.</summary>
    private static async Task<Socket> ConnectPatientlyAsync(string path)
    {
        for (var attempt = 0; ; attempt++)
        {
            var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                await s.ConnectAsync(new UnixDomainSocketEndPoint(path));
                return s;
            }
            catch (SocketException e) when (e.SocketErrorCode == SocketError.WouldBlock && attempt < 1000)
            {
                s.Dispose();
                await Task.Delay(5);
            }
        }
    }

    private static async Task<QmpClient> ConnectQmpPatientlyAsync(DaemonProcess d)
    {
        for (var attempt = 0; ; attempt++)
        {
            try
            {
                return await d.ConnectAsync();
            }
            catch (SocketException e) when (e.SocketErrorCode == SocketError.WouldBlock && attempt < 1000)
            {
                await Task.Delay(10);
            }
        }
    }

    [Fact]
    public async Task The_QMP_session_limit_is_configurable_and_clients_beyond_it_wait_for_a_free_session()
    {
        var dir = DaemonProcess.NewDirectory();
        await using var d = await DaemonProcess.StartAsync(["--qmp-max-sessions", "2"], dir);
        var first = await d.ConnectAsync();
        await using var second = await d.ConnectAsync();

        // The third is connected (it waits in the listen backlog) but gets no greeting while two are served.
        using var third = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await third.ConnectAsync(new UnixDomainSocketEndPoint(d.QmpSocket));
        var buffer = new byte[4096];
        using (var quiet = new CancellationTokenSource(TimeSpan.FromSeconds(1.5)))
        {
            await FluentActions.Awaiting(async () => await third.ReceiveAsync(buffer, SocketFlags.None, quiet.Token))
                .Should().ThrowAsync<OperationCanceledException>();
        }
        (await second.ExecuteAsync("query-version")).Should().ContainKey("return", "the sessions within the limit are served");

        await first.DisposeAsync();
        using var greeted = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var n = await third.ReceiveAsync(buffer, SocketFlags.None, greeted.Token);
        System.Text.Encoding.UTF8.GetString(buffer, 0, n).Should().StartWith("{\"QMP\"", "a session ended, so the waiting client is served");
    }

    [Fact]
    public async Task A_flood_to_the_open_file_limit_leaves_the_daemon_serving()
    {
        var dir = DaemonProcess.NewDirectory();
        var nbd = Path.Combine(dir, "nbd.sock");
        await using var d = await DaemonProcess.StartAsync(["--nofile=256:256", .. DaemonProcess.DaemonCommand, "--nbd-server", $"addr.type=unix,addr.path={nbd}"],
            dir, executable: "prlimit");
        await using var old = await d.ConnectAsync();
        d.HasExited.Should().BeFalse(d.Stderr);

        var flood = Flood(d.QmpSocket, 400);
        flood.AddRange(Flood(nbd, 400));
        try
        {
            await Task.Delay(1000);
            d.HasExited.Should().BeFalse(d.Stderr);
            var before = CpuTicks(d.Pid);
            await Task.Delay(2000);
            (CpuTicks(d.Pid) - before).Should().BeLessThan(30, "out of connection slots the daemon waits, it does not spin (ticks of 10 ms over 2 s)");
            (await old.ExecuteAsync("query-version")).Should().ContainKey("return", "a client connected before the flood is still served");
            d.HasExited.Should().BeFalse();
        }
        finally
        {
            foreach (var s in flood)
            {
                s.Dispose();
            }
        }

        // The closed flood still sits in the backlog until the daemon has accepted and dropped it.
        var fresh = await ConnectQmpPatientlyAsync(d);
        await using var freshClient = fresh;
        (await fresh.ExecuteAsync("query-version")).Should().ContainKey("return", "new QMP clients are served once the flood ends");
        (await NbdGreetingAsync(nbd)).Should().HaveCount(18, "new NBD clients are served once the flood ends");
        d.HasExited.Should().BeFalse();
        d.Stderr.Should().NotContain("OutOfMemory").And.NotContain("Too many open files in system");
    }

    [Fact]
    public async Task A_thousand_idle_NBD_connections_do_not_stop_other_clients()
    {
        var dir = DaemonProcess.NewDirectory();
        var nbd = Path.Combine(dir, "nbd.sock");
        await using var d = await DaemonProcess.StartAsync(["--nbd-server", $"addr.type=unix,addr.path={nbd}"], dir);
        await using var qmp = await d.ConnectAsync();
        var idle = new List<Socket>();
        try
        {
            for (var i = 0; i < 1000; i++)
            {
                idle.Add(await ConnectPatientlyAsync(nbd));
            }
            (await NbdGreetingAsync(nbd)).Should().HaveCount(18);
            (await qmp.ExecuteAsync("query-version")).Should().ContainKey("return");
            d.HasExited.Should().BeFalse();
        }
        finally
        {
            foreach (var s in idle)
            {
                s.Dispose();
            }
        }
    }

    [Fact]
    public async Task A_client_that_does_not_negotiate_is_dropped_and_a_negotiated_one_is_not()
    {
        // QSD 7.2 (Debian, CVE-2024-7409) drops a silent client after 10 s, measured 10.04 s; the limit is
        // handshake-max-seconds here, as in QEMU 9.1, so the test need not wait ten seconds.
        var dir = DaemonProcess.NewDirectory();
        var nbd = Path.Combine(dir, "nbd.sock");
        var disk = Path.Combine(dir, "disk.raw");
        await Tool.RunAsync("qemu-img", "create", "-f", "raw", disk, "1M");
        await using var d = await DaemonProcess.StartAsync(
        [
            "--blockdev", $"file,filename={disk},node-name=n",
            "--nbd-server", $"addr.type=unix,addr.path={nbd},handshake-max-seconds=1",
            "--export", "nbd,id=e,node-name=n,writable=on",
        ], dir);
        using var silent = await ConnectPatientlyAsync(nbd);
        var negotiated = Tool.RunWithExitCodeAsync("qemu-io", "-f", "raw", $"nbd+unix:///n?socket={nbd}",
            "-c", "sleep 2500", "-c", "write -P 0x5a 0 4k", "-c", "read -P 0x5a 0 4k");

        var started = DateTime.UtcNow;
        var buffer = new byte[64];
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var total = 0;
        int n;
        while ((n = await silent.ReceiveAsync(buffer, SocketFlags.None, cts.Token)) > 0)
        {
            total += n;
        }
        total.Should().Be(18, "the greeting is sent, then nothing until the connection is closed");
        (DateTime.UtcNow - started).Should().BeGreaterThan(TimeSpan.FromSeconds(0.8)).And.BeLessThan(TimeSpan.FromSeconds(10));

        var (code, stdout, stderr) = await negotiated;
        code.Should().Be(0, stderr);
        stdout.Should().NotContain("failed");
    }

    [Theory]
    [InlineData("""{"execute":"query-status","execute":"query-version"}""", "JSON parse error, duplicate key")]
    [InlineData("""{"execute":"query-version","arguments":{"a":1,"a":2}}""", "JSON parse error, duplicate key")]
    [InlineData("""{"execute":"query-version","id":"\udbff"}""", """JSON parse error, \udbff is not a valid Unicode character""")]
    public async Task Malformed_QMP_gets_QSDs_error_and_the_connection_stays(string request, string desc)
    {
        await using var d = await DaemonProcess.StartAsync([]);
        await using var qmp = await d.ConnectAsync();
        await qmp.SendRawAsync(request + "\n");
        var reply = await qmp.NextReplyAsync(TimeSpan.FromSeconds(10));
        reply["error"]!["class"]!.GetValue<string>().Should().Be("GenericError");
        reply["error"]!["desc"]!.GetValue<string>().Should().Be(desc);
        (await qmp.ExecuteAsync("query-version")).Should().ContainKey("return");
    }
}
