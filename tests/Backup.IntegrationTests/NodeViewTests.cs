using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// query-named-block-nodes for a file+qcow2 source, a qcow2 target and a running backup, field by field
/// where QSD 7.2 (checked live with the same set-up) differs from a naive view.
/// </summary>
public class NodeViewTests
{
    [Fact]
    public async Task Node_views_match_QSD_during_a_backup()
    {
        var dir = DaemonProcess.NewDirectory();
        foreach (var name in new[] { "s.qcow2", "t.qcow2" })
        {
            await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, name), "64M");
        }
        await using var daemon = await DaemonProcess.StartAsync([
            "--blockdev", $"driver=file,node-name=sf,filename={dir}/s.qcow2", "--blockdev", "driver=qcow2,node-name=src,file=sf",
            "--blockdev", $"driver=file,node-name=tf,filename={dir}/t.qcow2", "--blockdev", "driver=qcow2,node-name=tgt,file=tf",
        ], dir);
        await using var qmp = await daemon.ConnectAsync();
        async Task<Dictionary<string, JsonObject>> NodesAsync(bool flat) =>
            (await qmp.ExecuteAsync("query-named-block-nodes", new { flat }))["return"]!.AsArray()
                .Select(n => n!.AsObject()).ToDictionary(n => n["node-name"]!.GetValue<string>());

        // A fresh qcow2 file is 196616 bytes; QEMU counts whole 512-byte sectors.
        (await NodesAsync(false))["tf"]["image"]!["virtual-size"]!.GetValue<long>().Should().Be(197120);

        (await qmp.ExecuteAsync("blockdev-backup", new JsonObject
        {
            ["job-id"] = "j", ["device"] = "src", ["target"] = "tgt", ["sync"] = "full", ["speed"] = 1024, ["filter-node-name"] = "cbw",
        })).Should().ContainKey("return");
        // The filter's depth counts its file child, but only in the walk that builds backing-image, which flat skips.
        (await NodesAsync(false))["cbw"]["backing_file_depth"]!.GetValue<int>().Should().Be(1);
        (await NodesAsync(true))["cbw"]["backing_file_depth"]!.GetValue<int>().Should().Be(0);
        (await qmp.ExecuteAsync("job-cancel", new { id = "j" })).Should().ContainKey("return");
    }
}
