using System.Text.Json.Nodes;

namespace Backup.IntegrationTests.Support;

/// <summary>
/// iotest-style scenarios: a readable file of requests and the replies expected for them.
/// <list type="bullet">
/// <item><c># args: ...</c> the daemon's command line ($DIR is its directory), one argument a line after it, each line starting with <c>#   </c></item>
/// <item><c># file: NAME SIZE</c> a sparse file to create before start</item>
/// <item><c>-> {json}</c> a request; <c>=> text</c> raw bytes (a newline is added); <c>&lt;- {json}</c> the expected reply</item>
/// </list>
/// Expected replies are compared as JSON; "$DIR" stands for the directory and "&lt;int&gt;" matches any integer.
/// </summary>
public static class TranscriptRunner
{
    public static async Task RunAsync(string path)
    {
        var lines = File.ReadAllLines(path);
        var dir = DaemonProcess.NewDirectory();
        var args = new List<string>();
        var inArgs = false;
        foreach (var line in lines.TakeWhile(l => l.StartsWith('#')))
        {
            if (line.StartsWith("# file: ", StringComparison.Ordinal))
            {
                var parts = line[8..].Split(' ');
                await using var f = File.Create(Path.Combine(dir, parts[0]));
                f.SetLength(long.Parse(parts[1], System.Globalization.CultureInfo.InvariantCulture));
                inArgs = false;
            }
            else if (line.StartsWith("# args:", StringComparison.Ordinal))
            {
                inArgs = true;
            }
            else if (inArgs && line.StartsWith("#   ", StringComparison.Ordinal))
            {
                args.Add(line[4..].Replace("$DIR", dir, StringComparison.Ordinal));
            }
        }
        await using var daemon = await DaemonProcess.StartAsync(args, dir);
        await using var qmp = await daemon.ConnectAsync(negotiate: false);
        var expectIndex = 0;
        var steps = lines.Where(l => l.StartsWith("->", StringComparison.Ordinal) || l.StartsWith("=>", StringComparison.Ordinal) || l.StartsWith("<-", StringComparison.Ordinal)).ToList();
        for (var i = 0; i < steps.Count; i++)
        {
            var step = steps[i];
            if (step.StartsWith("<-", StringComparison.Ordinal))
            {
                var expected = JsonNode.Parse(step[2..].Replace("$DIR", dir, StringComparison.Ordinal));
                var actual = i == 0 ? qmp.Greeting : await qmp.NextReplyAsync();
                Matches(expected, actual).Should().BeTrue($"step {++expectIndex} of {Path.GetFileName(path)}: expected\n{expected!.ToJsonString()}\ngot\n{actual.ToJsonString()}");
                continue;
            }
            var payload = step[2..].Trim().Replace("$DIR", dir, StringComparison.Ordinal);
            await qmp.SendRawAsync(payload + "\n");
        }
    }

    private static bool Matches(JsonNode? expected, JsonNode? actual)
    {
        switch (expected)
        {
            case null:
                return actual is null;
            case JsonValue v when v.TryGetValue<string>(out var s) && s == "<int>":
                return actual is JsonValue av && av.TryGetValue<long>(out _);
            case JsonValue v when v.TryGetValue<string>(out var s) && s == "<str>":
                return actual is JsonValue sv && sv.TryGetValue<string>(out _);
            case JsonObject eo:
                return actual is JsonObject ao && eo.Count == ao.Count && eo.All(kv => ao.ContainsKey(kv.Key) && Matches(kv.Value, ao[kv.Key]));
            case JsonArray ea:
                return actual is JsonArray aa && ea.Count == aa.Count && ea.Zip(aa).All(p => Matches(p.First, p.Second));
            default:
                return JsonNode.DeepEquals(expected, actual);
        }
    }
}
