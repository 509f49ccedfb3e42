using System.Diagnostics;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Many clients at once: every reply arrives, in order, to the right client; a client sending garbage
/// or one that never reads cannot hold the others up. These check correctness, not speed: the only
/// timing is a generous bound on the slowdown a garbage client may cause.
/// </summary>
public class ConcurrencyTests
{
    private static async Task RunClientAsync(string socket, int client, int commands)
    {
        await using var qmp = await QmpClient.ConnectAsync(socket);
        const int window = 50;
        for (var sent = 0; sent < commands; sent += window)
        {
            var n = Math.Min(window, commands - sent);
            var batch = string.Concat(Enumerable.Range(sent, n).Select(i =>
                new JsonObject { ["execute"] = i % 2 == 0 ? "query-version" : "query-named-block-nodes", ["id"] = new JsonArray(client, i) }.ToJsonString() + "\n"));
            await qmp.SendRawAsync(batch);
            for (var i = sent; i < sent + n; i++)
            {
                var reply = await qmp.NextReplyAsync();
                reply["id"]!.ToJsonString().Should().Be($"[{client},{i}]");
                reply.Should().ContainKey("return");
            }
        }
    }

    [Fact]
    public async Task Fifty_clients_each_get_a_thousand_correct_replies_in_order()
    {
        var dir = DaemonProcess.NewDirectory();
        await using (var f = File.Create(Path.Combine(dir, "d.img")))
        {
            f.SetLength(1 << 20);
        }
        await using var d = await DaemonProcess.StartAsync(["--blockdev", "driver=file,node-name=file0,filename=d.img"], dir);
        await Task.WhenAll(Enumerable.Range(0, 50).Select(c => RunClientAsync(d.QmpSocket, c, 1000)));
        d.HasExited.Should().BeFalse();
    }

    [Fact]
    public async Task A_client_sending_garbage_at_full_speed_slows_others_by_less_than_2x()
    {
        await using var d = await DaemonProcess.StartAsync([]);
        await RunClientAsync(d.QmpSocket, 0, 300); // warm-up (JIT)
        var sw = Stopwatch.StartNew();
        await RunClientAsync(d.QmpSocket, 1, 5000);
        var alone = sw.Elapsed;

        using var stop = new CancellationTokenSource();
        await using var garbage = await d.ConnectAsync(negotiate: false);
        var line = "{\"execute\": nonsense}\n}\n" + new string('x', 1000) + "\n";
        var flood = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                await garbage.SendRawAsync(line);
            }
        });
        // Drain its error replies so that it keeps the daemon busy instead of blocking on its own output.
        var drain = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                try
                {
                    await garbage.NextReplyAsync(TimeSpan.FromSeconds(1));
                }
                catch (OperationCanceledException)
                {
                }
            }
        });
        await Task.Delay(200);
        sw.Restart();
        await RunClientAsync(d.QmpSocket, 2, 5000);
        var withGarbage = sw.Elapsed;
        await stop.CancelAsync();
        await Task.WhenAll(flood.ContinueWith(_ => { }, TaskScheduler.Default), drain.ContinueWith(_ => { }, TaskScheduler.Default));

        withGarbage.Should().BeLessThan(alone * 2 + TimeSpan.FromMilliseconds(500),
            $"alone {alone.TotalMilliseconds:F0} ms, with a garbage client {withGarbage.TotalMilliseconds:F0} ms");
    }

    [Fact]
    public async Task A_client_that_never_reads_its_replies_does_not_stall_others()
    {
        await using var d = await DaemonProcess.StartAsync([]);
        using var deaf = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
        await deaf.ConnectAsync(new System.Net.Sockets.UnixDomainSocketEndPoint(d.QmpSocket));
        deaf.Blocking = false;
        // Requests with large replies that it never reads: its socket buffers fill and its session waits.
        var request = System.Text.Encoding.UTF8.GetBytes("{\"execute\": \"qmp_capabilities\"}\n" + string.Concat(Enumerable.Repeat("{\"execute\": \"query-qmp-schema\"}\n", 2000)));
        var sent = 0;
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (sent < request.Length && DateTime.UtcNow < deadline)
        {
            try
            {
                sent += deaf.Send(request, sent, request.Length - sent, System.Net.Sockets.SocketFlags.None);
            }
            catch (System.Net.Sockets.SocketException)
            {
                await Task.Delay(10);
            }
        }
        await using var qmp = await d.ConnectAsync();
        for (var i = 0; i < 20; i++)
        {
            (await qmp.ExecuteAsync("query-version")).Should().ContainKey("return");
        }
        d.HasExited.Should().BeFalse();
    }
}
