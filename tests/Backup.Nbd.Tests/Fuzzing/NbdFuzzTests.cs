using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using Backup.Nbd.Protocol;
using Backup.Nbd.Tests.Support;
using Backup.Tests.Fuzzing;
using Xunit.Abstractions;

namespace Backup.Nbd.Tests.Fuzzing;

/// <summary>
/// Seeded random and mutation fuzzing of the NBD handshake and the request parser, in-process against
/// the real server on a Unix socket. Each fuzz connection sends a generated stream (client flags,
/// options with random or mutated payloads, then possibly NBD_OPT_GO and random or mutated requests),
/// closes its sending side and must see the server close the connection within a deadline (no hang);
/// meanwhile a well-behaved client writes and reads back its own export throughout, and managed memory
/// returns to its baseline. BACKUPD_FUZZ_SECONDS and BACKUPD_FUZZ_SEED as for the QMP fuzzer.
/// </summary>
[Collection(FuzzCollection.Name)]
public class NbdFuzzTests(ITestOutputHelper output)
{
    private const int DiskSize = 1 << 20;

    [Fact]
    public async Task Random_and_mutated_handshakes_and_requests_never_hang_or_disturb_a_good_client()
    {
        var seed = FuzzSettings.Seed;
        var duration = FuzzSettings.Duration;
        output.WriteLine($"NBD fuzz: seed {seed} (replay with BACKUPD_FUZZ_SEED={seed}), {duration.TotalSeconds} s");
        var random = new Random(seed);

        await using var f = NbdFixture.Create();
        await f.AddMemoryNodeAsync("fuzz", DiskSize);
        await f.AddMemoryNodeAsync("good", DiskSize);
        f.Export("e-fuzz", "fuzz", writable: true);
        f.Export("e-good", "good", writable: true);
        var baseline = FuzzSettings.ManagedMemory();

        using var stopGood = new CancellationTokenSource();
        var good = ServeWellBehavedAsync(f, stopGood.Token);

        long connections = 0, bytes = 0, reachedTransmission = 0;
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < duration)
        {
            var (stream, transmission) = NbdInputGenerator.Generate(random, "fuzz", DiskSize);
            bytes += stream.Length;
            reachedTransmission += transmission ? 1 : 0;
            connections++;
            using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(f.SocketPath));
            try
            {
                await socket.SendAsync(stream, SocketFlags.None);
                socket.Shutdown(SocketShutdown.Send);
            }
            catch (SocketException)
            {
                // The server may close on bad input before reading everything; that is its right.
            }
            (await DrainUntilClosedAsync(socket, TimeSpan.FromSeconds(10))).Should().BeTrue(
                "the server closes a connection whose client has stopped sending (seed {0}, connection {1})", seed, connections);
        }
        await stopGood.CancelAsync();
        var (served, worst) = await good;
        var after = FuzzSettings.ManagedMemory();
        output.WriteLine($"NBD fuzz: {connections} connections ({bytes} bytes, {reachedTransmission} with NBD_OPT_GO), " +
                         $"{clock.Elapsed.TotalSeconds:F1} s; good client: {served} write+read pairs, worst {worst.TotalMilliseconds:F0} ms; " +
                         $"managed memory {baseline / 1024} KiB -> {after / 1024} KiB; findings 0");
        served.Should().BePositive();
        worst.Should().BeLessThan(TimeSpan.FromSeconds(5), "the fuzz connections must not hold up a good client (a loose bound: CI machines are shared)");
        after.Should().BeLessThan(baseline + (32L << 20));
    }

    private static async Task<bool> DrainUntilClosedAsync(Socket socket, TimeSpan timeout)
    {
        var buffer = new byte[64 * 1024];
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            while (await socket.ReceiveAsync(buffer, SocketFlags.None, cts.Token) > 0)
            {
            }
            return true;
        }
        catch (SocketException)
        {
            return true; // reset by the server: closed too
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    private static async Task<(int Served, TimeSpan Worst)> ServeWellBehavedAsync(NbdFixture f, CancellationToken stop)
    {
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("good");
        var pattern = new byte[4096];
        return await WellBehavedClient.RunAsync(async round =>
        {
            pattern.AsSpan().Fill((byte)round);
            var offset = (ulong)(round % (DiskSize / 4096) * 4096);
            await c.SendRequestAsync(NbdWire.NBD_CMD_WRITE, offset, 4096, 1, payload: pattern);
            (await c.ReadSimpleReplyAsync()).Error.Should().Be(0);
            await c.SendRequestAsync(NbdWire.NBD_CMD_READ, offset, 4096, 2);
            var (error, _, data) = await c.ReadSimpleReplyAsync(4096);
            error.Should().Be(0);
            data.Should().Equal(pattern);
        }, TimeSpan.FromMilliseconds(5), stop);
    }

}
