using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

public class EventTests
{
    [Fact]
    public async Task Events_reach_every_negotiated_session_with_a_timestamp_and_no_session_still_negotiating()
    {
        var dir = DaemonProcess.NewDirectory();
        await using (var f = File.Create(Path.Combine(dir, "d.img")))
        {
            f.SetLength(1 << 20);
        }
        var nbd = Path.Combine(dir, "nbd.sock");
        await using var d = await DaemonProcess.StartAsync(
            ["--blockdev", "driver=raw,node-name=drive0,file.driver=file,file.filename=d.img",
             "--nbd-server", $"addr.type=unix,addr.path={nbd}",
             "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on"], dir);
        await using var a = await d.ConnectAsync();
        await using var b = await d.ConnectAsync();
        await using var negotiating = await d.ConnectAsync(negotiate: false);

        (await a.ExecuteAsync("block-export-del", new { id = "e0" })).Should().ContainKey("return");

        foreach (var client in new[] { a, b })
        {
            var e = await client.NextEventAsync();
            e["event"]!.GetValue<string>().Should().Be("BLOCK_EXPORT_DELETED");
            e["data"]!["id"]!.GetValue<string>().Should().Be("e0");
            e["timestamp"]!["seconds"]!.GetValue<long>().Should().BeCloseTo(DateTimeOffset.UtcNow.ToUnixTimeSeconds(), 60);
            e["timestamp"]!["microseconds"]!.GetValue<long>().Should().BeInRange(0, 999_999);
        }
        (await negotiating.ExecuteAsync("qmp_capabilities")).Should().ContainKey("return");
        var act = async () => await negotiating.NextEventAsync(TimeSpan.FromMilliseconds(300));
        await act.Should().ThrowAsync<OperationCanceledException>("the event happened before it negotiated");
    }
}
