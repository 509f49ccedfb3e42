using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using Backup.Tests.Fuzzing;
using Xunit.Abstractions;

namespace Backup.Qmp.Tests.Fuzzing;

/// <summary>
/// Seeded random and mutation fuzzing of the QMP input path, in-process against the real session code:
/// every batch is followed by a resync byte and a sentinel request whose reply must come back (no hang,
/// the session survives), every reply is a JSON object with "return" or "error", no error carries .NET
/// text, a well-behaved client on another session is served throughout, and managed memory returns to
/// its baseline.
/// </summary>
[Collection(FuzzCollection.Name)]
public class QmpFuzzTests(ITestOutputHelper output)
{
    /// <summary>0x01 is invalid anywhere in JSON, even inside a string: it ends whatever half-message a mutation left open.</summary>
    private static readonly byte[] Resync = [0x01, (byte)'\n'];

    [Fact]
    public async Task Random_and_mutated_input_never_hangs_leaks_or_shows_dotnet_text()
    {
        var seed = FuzzSettings.Seed;
        var duration = FuzzSettings.Duration;
        output.WriteLine($"QMP fuzz: seed {seed} (replay with BACKUPD_FUZZ_SEED={seed}), {duration.TotalSeconds} s");
        var generator = new QmpInputGenerator(new Random(seed));

        await using var fuzz = new FuzzSession();
        using var hostile = await fuzz.ConnectAsync();
        using var good = await fuzz.ConnectAsync();
        var baseline = FuzzSettings.ManagedMemory();

        using var stopGood = new CancellationTokenSource();
        var goodClient = ServeWellBehavedAsync(good, stopGood.Token);

        long messages = 0, bytes = 0, replies = 0, errors = 0, batches = 0;
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < duration)
        {
            var batch = new List<byte>();
            var n = 1 + (int)(batches % 8);
            for (var i = 0; i < n; i++)
            {
                batch.AddRange(generator.Next());
                batch.Add((byte)'\n');
                messages++;
            }
            var sentinel = "s" + batches++;
            batch.AddRange(Resync);
            batch.AddRange(Encoding.UTF8.GetBytes($"{{\"execute\":\"query-version\",\"id\":\"{sentinel}\"}}\n"));
            bytes += batch.Count;
            await hostile.SendAsync([.. batch]);
            var (reply, before) = await hostile.ReadUntilIdAsync(sentinel, TimeSpan.FromSeconds(20));
            reply.Should().ContainKey("return", "the sentinel after batch {0} (seed {1}) must succeed", batches, seed);
            foreach (var r in before)
            {
                replies++;
                CheckReply(r, seed);
                if (r.ContainsKey("error"))
                {
                    errors++;
                }
            }
        }
        await stopGood.CancelAsync();
        var (served, worst) = await goodClient;

        var after = FuzzSettings.ManagedMemory();
        output.WriteLine($"QMP fuzz: {messages} messages ({bytes} bytes) in {batches} batches, {replies} replies ({errors} errors), " +
                         $"{clock.Elapsed.TotalSeconds:F1} s; good client: {served} requests, worst latency {worst.TotalMilliseconds:F0} ms; " +
                         $"managed memory {baseline / 1024} KiB -> {after / 1024} KiB; findings 0");
        served.Should().BePositive();
        worst.Should().BeLessThan(TimeSpan.FromSeconds(5), "garbage on one session must not hold up another (a loose bound: CI machines are shared)");
        after.Should().BeLessThan(baseline + (32L << 20), "what the fuzz input took is given back");
    }

    private static void CheckReply(JsonObject reply, int seed)
    {
        if (!reply.ContainsKey("return") && !reply.ContainsKey("error"))
        {
            Assert.Fail($"seed {seed}: a reply that is neither a return nor an error: {reply.ToJsonString(new System.Text.Json.JsonSerializerOptions { MaxDepth = 2048 })}");
        }
        if (reply["error"] is JsonObject error)
        {
            var desc = error["desc"]!.GetValue<string>();
            desc.Should().NotContain(FuzzSession.SecretText);
            desc.Should().NotContainAny(["Exception", "System.", "(Parameter '", "Utf8JsonReader", "JsonNode"]);
            error["class"]!.GetValue<string>().Should().BeOneOf("GenericError", "CommandNotFound");
        }
    }

    private static Task<(int Served, TimeSpan Worst)> ServeWellBehavedAsync(QmpLineClient client, CancellationToken stop) =>
        WellBehavedClient.RunAsync(async round =>
        {
            var id = "g" + round;
            await client.SendAsync(Encoding.UTF8.GetBytes($"{{\"execute\":\"query-version\",\"id\":\"{id}\"}}\n"));
            var (reply, before) = await client.ReadUntilIdAsync(id, TimeSpan.FromSeconds(10));
            reply.Should().ContainKey("return");
            before.Should().BeEmpty();
        }, TimeSpan.FromMilliseconds(10), stop);

}
