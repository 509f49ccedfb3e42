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
            var (stream, transmission) = Generate(random);
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

    private static (byte[] Stream, bool Transmission) Generate(Random random)
    {
        var ms = new MemoryStream();
        var be = new byte[8];
        void U16(ushort v) { BinaryPrimitives.WriteUInt16BigEndian(be, v); ms.Write(be, 0, 2); }
        void U32(uint v) { BinaryPrimitives.WriteUInt32BigEndian(be, v); ms.Write(be, 0, 4); }
        void U64(ulong v) { BinaryPrimitives.WriteUInt64BigEndian(be, v); ms.Write(be, 0, 8); }
        void Option(uint option, byte[] data)
        {
            U64(random.Next(20) == 0 ? (ulong)random.NextInt64() : NbdWire.IHAVEOPT);
            U32(option);
            U32(random.Next(20) == 0 ? (uint)random.Next() : (uint)data.Length);
            ms.Write(data);
        }
        byte[] Name(string name) => [.. BitConverter.IsLittleEndian ? BitConverter.GetBytes(BinaryPrimitives.ReverseEndianness(Encoding.UTF8.GetByteCount(name))) : [], .. Encoding.UTF8.GetBytes(name)];
        byte[] Junk(int max) { var b = new byte[random.Next(max)]; random.NextBytes(b); return b; }

        U32(random.Next(10) == 0 ? (uint)random.Next() : NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE | NbdWire.NBD_FLAG_C_NO_ZEROES);
        var options = random.Next(6);
        for (var i = 0; i < options; i++)
        {
            var option = (uint)random.Next(0, 13);
            byte[] data = random.Next(3) switch
            {
                0 => Junk(64),
                1 => [.. Name(random.Next(2) == 0 ? "fuzz" : "nope"), 0, 0],
                _ => [.. Name("fuzz"), .. BitConverter.GetBytes(BinaryPrimitives.ReverseEndianness(1)), .. Name("base:allocation")],
            };
            Option(option, data);
        }
        var transmission = random.Next(2) == 0;
        if (transmission)
        {
            if (random.Next(2) == 0)
            {
                Option(NbdWire.NBD_OPT_STRUCTURED_REPLY, []);
            }
            Option(NbdWire.NBD_OPT_GO, [.. Name("fuzz"), 0, 0]);
            var requests = random.Next(12);
            for (var i = 0; i < requests; i++)
            {
                var type = (ushort)random.Next(0, 10);
                var length = (uint)(random.Next(4) switch { 0 => random.Next(), 1 => 0, _ => random.Next(1, 70_000) });
                U32(random.Next(30) == 0 ? (uint)random.Next() : NbdWire.NBD_REQUEST_MAGIC);
                U16((ushort)(random.Next(4) == 0 ? random.Next(0, 64) : 0));
                U16(type);
                U64((ulong)i);
                U64((ulong)(random.Next(3) == 0 ? random.NextInt64() : random.Next(0, DiskSize)));
                U32(length);
                if (type == NbdWire.NBD_CMD_WRITE && random.Next(3) > 0)
                {
                    ms.Write(Junk((int)Math.Min(length, 70_000) + 1));
                }
            }
        }
        var bytes = ms.ToArray();
        // Mutate a few bytes of some streams, anywhere.
        if (random.Next(3) == 0 && bytes.Length > 0)
        {
            for (var i = random.Next(1, 4); i > 0; i--)
            {
                bytes[random.Next(bytes.Length)] ^= (byte)(1 << random.Next(8));
            }
        }
        return (bytes, transmission);
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
