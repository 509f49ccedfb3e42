using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using Backup.IntegrationTests.Support;
using Backup.Tests.Fuzzing;
using Xunit.Abstractions;

namespace Backup.IntegrationTests;

/// <summary>
/// The fuzzers' generators aimed at the real backupd process: mutated requests of its real commands on the
/// QMP socket and mutated NBD streams on its export socket, at once, while a well-behaved client uses
/// both. The process must not crash or hang, must keep serving that client, and must give its memory
/// back. Seeded (BACKUPD_FUZZ_SEED) and bounded (BACKUPD_FUZZ_SECONDS, 3 s by default) as the others.
/// </summary>
public sealed class BlackBoxFuzzTests(ITestOutputHelper output)
{
    private const int DiskSize = 1 << 20;

    /// <summary>Every command the fuzz may call; none that would take the good client's node or export away.</summary>
    private static readonly string[] Commands =
    [
        "query-version", "query-status", "query-block", "query-named-block-nodes", "query-jobs", "query-block-jobs",
        "query-block-exports", "query-commands", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
        "blockdev-backup", "job-cancel", "job-dismiss", "block-job-set-speed", "transaction", "qmp_capabilities", "nope",
    ];

    private static readonly string[] Members =
    [
        "node", "name", "granularity", "persistent", "disabled", "device", "target", "sync", "job-id", "bitmaps",
        "actions", "type", "data", "speed", "id", "flat", "bitmap",
    ];

    private static readonly string[] Templates =
    [
        """{"execute": "block-dirty-bitmap-add", "arguments": {"node": "fuzz", "name": "b1", "granularity": 65536}}""",
        """{"execute": "block-dirty-bitmap-merge", "arguments": {"node": "fuzz", "target": "b1", "bitmaps": ["b2"]}}""",
        """{"execute": "transaction", "arguments": {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "fuzz", "name": "b2"}}, {"type": "block-dirty-bitmap-clear", "data": {"node": "fuzz", "name": "b1"}}]}}""",
        """{"execute": "blockdev-backup", "arguments": {"job-id": "j", "device": "fuzz", "target": "sink", "sync": "full", "speed": 1048576}}""",
        """{"execute": "job-cancel", "arguments": {"id": "j"}}""",
        """{"execute": "block-dirty-bitmap-remove", "arguments": {"node": "fuzz", "name": "b1"}}""",
        """{"execute": "query-block", "id": {"n": [1, "x", null]}}""",
    ];

    [Fact]
    public async Task Mutated_QMP_and_NBD_input_to_the_process_never_crash_hang_or_starve_a_good_client()
    {
        var seed = FuzzSettings.Seed;
        var duration = FuzzSettings.Duration;
        output.WriteLine($"black-box fuzz: seed {seed} (replay with BACKUPD_FUZZ_SEED={seed}), {duration.TotalSeconds} s");

        var dir = DaemonProcess.NewDirectory();
        var nbd = Path.Combine(dir, "nbd.sock");
        foreach (var name in new[] { "fuzz", "good" })
        {
            await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", Path.Combine(dir, name + ".raw"), DiskSize.ToString(CultureInfo.InvariantCulture));
        }
        await using var d = await DaemonProcess.StartAsync(
        [
            "--blockdev", $"driver=file,node-name=fuzz,filename={Path.Combine(dir, "fuzz.raw")}",
            "--blockdev", $"driver=file,node-name=good,filename={Path.Combine(dir, "good.raw")}",
            "--blockdev", "driver=null-co,node-name=sink,size=1048576",
            "--nbd-server", $"addr.type=unix,addr.path={nbd}",
            "--export", "type=nbd,id=e-fuzz,node-name=fuzz,name=fuzz,writable=on",
            "--export", "type=nbd,id=e-good,node-name=good,name=good,writable=on",
        ], dir);
        await using var good = await d.ConnectAsync();
        var baseline = ResidentBytes(d.Pid);

        using var stop = new CancellationTokenSource(duration);
        var qmp = FuzzQmpAsync(d.QmpSocket, new Random(seed), stop.Token);
        var nbdFuzz = FuzzNbdAsync(nbd, new Random(seed ^ 0x5bd1e995), stop.Token);

        // The good client: a QMP round trip and an NBD write+read of its own export, over and over.
        var served = 0;
        var worst = TimeSpan.Zero;
        while (!stop.IsCancellationRequested)
        {
            var clock = Stopwatch.StartNew();
            (await good.ExecuteAsync("query-named-block-nodes")).Should().ContainKey("return");
            var pattern = $"0x{served % 250 + 1:x2}";
            var (code, _, stderr) = await Tool.RunWithExitCodeAsync("qemu-io", "-f", "raw", $"nbd+unix:///good?socket={nbd}",
                "-c", $"write -P {pattern} 64k 64k", "-c", $"read -P {pattern} 64k 64k");
            code.Should().Be(0, stderr);
            worst = clock.Elapsed > worst ? clock.Elapsed : worst;
            served++;
        }
        var (qmpConnections, qmpMessages) = await qmp;
        var (nbdConnections, nbdBytes) = await nbdFuzz;

        d.HasExited.Should().BeFalse(d.Stderr);
        (await good.ExecuteAsync("query-version")).Should().ContainKey("return");
        await Task.Delay(TimeSpan.FromSeconds(3)); // the large-message reclaimer runs at most every 2 s
        var after = ResidentBytes(d.Pid);
        output.WriteLine($"black-box fuzz: QMP {qmpConnections} connections, {qmpMessages} messages; NBD {nbdConnections} connections, " +
                         $"{nbdBytes} bytes; good client {served} rounds, worst {worst.TotalMilliseconds:F0} ms; RSS {baseline >> 20} MiB -> {after >> 20} MiB");
        served.Should().BePositive();
        worst.Should().BeLessThan(TimeSpan.FromSeconds(10), "the fuzz must not hold up a good client (loose: CI machines are shared)");
        after.Should().BeLessThan(baseline + (128L << 20), "memory taken by fuzz input is given back");
    }

    private static async Task<(long Connections, long Messages)> FuzzQmpAsync(string socketPath, Random random, CancellationToken stop)
    {
        var generator = new QmpInputGenerator(random, Commands, Members, Templates);
        long connections = 0, messages = 0;
        while (!stop.IsCancellationRequested)
        {
            using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath));
            connections++;
            var drain = DrainAsync(socket);
            try
            {
                if (random.Next(4) > 0)
                {
                    await socket.SendAsync("{\"execute\": \"qmp_capabilities\"}\n"u8.ToArray(), SocketFlags.None);
                }
                for (var i = random.Next(1, 40); i > 0 && !stop.IsCancellationRequested; i--)
                {
                    await socket.SendAsync((byte[])[.. generator.Next(), (byte)'\n'], SocketFlags.None);
                    messages++;
                }
                socket.Shutdown(SocketShutdown.Send);
            }
            catch (SocketException)
            {
                // The daemon may close a session on bad input; that is its right.
            }
            (await drain).Should().BeTrue("the daemon answers and closes a session whose client stopped sending");
        }
        return (connections, messages);
    }

    private static async Task<(long Connections, long Bytes)> FuzzNbdAsync(string socketPath, Random random, CancellationToken stop)
    {
        long connections = 0, bytes = 0;
        while (!stop.IsCancellationRequested)
        {
            var (stream, _) = NbdInputGenerator.Generate(random, "fuzz", DiskSize);
            using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath));
            connections++;
            bytes += stream.Length;
            var drain = DrainAsync(socket);
            try
            {
                await socket.SendAsync(stream, SocketFlags.None);
                socket.Shutdown(SocketShutdown.Send);
            }
            catch (SocketException)
            {
            }
            (await drain).Should().BeTrue("the server closes a connection whose client has stopped sending");
        }
        return (connections, bytes);
    }

    /// <summary>Reads until the peer closes; false if it has not within 20 s.</summary>
    private static async Task<bool> DrainAsync(Socket socket)
    {
        var buffer = new byte[64 * 1024];
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        try
        {
            while (await socket.ReceiveAsync(buffer, SocketFlags.None, timeout.Token) > 0)
            {
            }
            return true;
        }
        catch (SocketException)
        {
            return true;
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    private static long ResidentBytes(int pid)
    {
        var line = File.ReadLines($"/proc/{pid}/status").First(l => l.StartsWith("VmRSS:", StringComparison.Ordinal));
        return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) * 1024;
    }
}
