using System.Text;
using System.Text.Json.Nodes;
using Backup.Qmp.Session;

namespace Backup.Qmp.Tests.Fuzzing;

/// <summary>
/// Malformed requests get QSD 7.2's error (checked live against qemu-storage-daemon) and the session goes on.
/// </summary>
public class HostileInputTests
{
    private static async Task<JsonObject> OneReplyAsync(QmpLineClient client, byte[] request)
    {
        await client.SendAsync([.. request, (byte)'\n']);
        var line = await client.ReadLineAsync(TimeSpan.FromSeconds(10));
        line.Should().NotBeNull();
        return QmpLineClient.Parse(line!)!.AsObject();
    }

    private static async Task ShouldStillServeAsync(QmpLineClient client)
    {
        var reply = await OneReplyAsync(client, "{\"execute\":\"query-version\",\"id\":7}"u8.ToArray());
        reply.ToJsonString().Should().Be("{\"return\":{\"v\":1},\"id\":7}");
    }

    [Theory]
    [InlineData("""{"execute":"query-version","execute":"t"}""", "JSON parse error, duplicate key")]
    [InlineData("""{"execute":"t","arguments":{"node":"a","node":"b"}}""", "JSON parse error, duplicate key")]
    [InlineData("""{"execute":"t","arguments":{"inner":{"name":"a","name":"b"},"node":"x"}}""", "JSON parse error, duplicate key")]
    [InlineData("""{"execute":"query-version","id":"\udbff"}""", """JSON parse error, \udbff is not a valid Unicode character""")]
    [InlineData("""{"execute":"query-version","id":"\udc00"}""", """JSON parse error, \udc00 is not a valid Unicode character""")]
    [InlineData("""{"execute":"query-version","id":"x\ud800y"}""", """JSON parse error, \ud800 is not a valid Unicode character""")]
    [InlineData("""{"execute":"query-version","id":"x\\ud800"}""", null)]
    [InlineData("""{"execute":"boom"}""", QmpSession.InternalErrorDesc)]
    [InlineData("""[]""", "QMP input must be a JSON object")]
    [InlineData("""{"execute":1}""", "QMP input member 'execute' must be a string")]
    public async Task Gets_QSDs_error_and_stays_connected(string request, string? desc)
    {
        await using var fuzz = new FuzzSession();
        using var client = await fuzz.ConnectAsync();
        var reply = await OneReplyAsync(client, Encoding.UTF8.GetBytes(request));
        if (desc is null)
        {
            reply.Should().ContainKey("return");
        }
        else
        {
            reply.ToJsonString().Should().Be(new JsonObject
            {
                ["error"] = new JsonObject { ["class"] = "GenericError", ["desc"] = desc },
            }.ToJsonString());
        }
        await ShouldStillServeAsync(client);
    }

    [Fact]
    public async Task Invalid_UTF8_in_a_string_is_a_parse_error()
    {
        await using var fuzz = new FuzzSession();
        using var client = await fuzz.ConnectAsync();
        var reply = await OneReplyAsync(client, [.. "{\"execute\":\"query-version\",\"id\":\""u8, 0xed, 0xa0, 0x80, (byte)'"', (byte)'}']);
        reply["error"]!["desc"]!.GetValue<string>().Should().Be("JSON parse error, invalid UTF-8 sequence in string");
        await ShouldStillServeAsync(client);
    }

    [Theory]
    [InlineData(1023, null)]
    [InlineData(1024, "JSON nesting depth limit exceeded")]
    public async Task Nesting_is_bounded_at_QEMUs_depth(int arrays, string? desc)
    {
        // QSD: an object holding 1023 nested arrays is accepted, 1024 are refused.
        await using var fuzz = new FuzzSession();
        using var client = await fuzz.ConnectAsync();
        var request = "{\"execute\":\"query-version\",\"id\":" + new string('[', arrays) + new string(']', arrays) + "}";
        var reply = await OneReplyAsync(client, Encoding.UTF8.GetBytes(request));
        if (desc is null)
        {
            reply.Should().ContainKey("return");
        }
        else
        {
            reply["error"]!["desc"]!.GetValue<string>().Should().Be(desc);
        }
        await ShouldStillServeAsync(client);
    }

    [Fact]
    public async Task Token_count_is_bounded_at_QEMUs_limit()
    {
        // QSD: an id of 2^20 ones in an array (2^21 + 9 tokens with the commas) is refused with these words.
        await using var fuzz = new FuzzSession();
        using var client = await fuzz.ConnectAsync();
        var request = "{\"execute\":\"query-version\",\"id\":[" + string.Join(",", Enumerable.Repeat("1", 1 << 20)) + "]}";
        var reply = await OneReplyAsync(client, Encoding.UTF8.GetBytes(request));
        reply["error"]!["desc"]!.GetValue<string>().Should().Be("JSON token count limit exceeded");
        await ShouldStillServeAsync(client);
    }

    [Fact]
    public async Task A_message_over_the_size_limit_is_refused_and_skipped()
    {
        await using var fuzz = new FuzzSession();
        using var client = await fuzz.ConnectAsync();
        var request = "{\"execute\":\"query-version\",\"id\":\"" + new string('a', QmpSession.MaxMessageBytes) + "\"}";
        var reply = await OneReplyAsync(client, Encoding.UTF8.GetBytes(request));
        reply["error"]!["desc"]!.GetValue<string>().Should().Be("JSON token size limit exceeded");
        await ShouldStillServeAsync(client);
    }
}
