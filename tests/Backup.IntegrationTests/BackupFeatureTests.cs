using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Backup features beyond the copy itself, black box: image fleecing with sync=none, compressed
/// targets and the copy-before-write filter node, checked with qemu-img, qemu-io and NBD clients.
/// </summary>
public sealed class BackupFeatureTests : IAsyncLifetime
{
    private const int MiB = 1 << 20;
    private string _dir = "";
    private DaemonProcess? _daemon;
    private QmpClient? _qmp;

    private QmpClient Qmp => _qmp!;

    private string Socket => Path.Combine(_dir, "nbd.sock");

    private string Uri(string export) => $"nbd+unix:///{export}?socket={Socket}";

    public async Task InitializeAsync()
    {
        _dir = DaemonProcess.NewDirectory();
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_dir, "disk.qcow2"), "64M");
        _daemon = await DaemonProcess.StartAsync(
        [
            "--blockdev", "driver=file,node-name=file0,filename=disk.qcow2",
            "--blockdev", "driver=qcow2,node-name=drive0,file=file0",
            "--nbd-server", $"addr.type=unix,addr.path={Socket}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on",
        ], _dir);
        _qmp = await _daemon.ConnectAsync();
    }

    public Task DisposeAsync() => DaemonProcess.ShutdownAsync(_qmp, _daemon);

    private Task<string> GuestWriteAsync(byte pattern, long offset, long length) =>
        Tool.RunAsync("qemu-io", "-f", "raw", Uri("drive0"), "-c", $"write -P 0x{pattern:x2} {offset} {length}");

    /// <summary>What an NBD export reads as now, copied into a raw file.</summary>
    private async Task<string> CopyExportAsync(string export, string name)
    {
        var path = Path.Combine(_dir, name);
        await Tool.RunAsync("qemu-img", "convert", "-f", "raw", "-O", "raw", Uri(export), path);
        return path;
    }

    private async Task<JsonObject> ExecuteOkAsync(string command, object? arguments = null)
    {
        var reply = await Qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("return", reply.ToJsonString());
        return reply;
    }

    private async Task<string> ErrorOfAsync(string command, object arguments)
    {
        var reply = await Qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("error", reply.ToJsonString());
        return reply["error"]!["desc"]!.GetValue<string>();
    }

    private async Task WaitForEventAsync(string name, string job)
    {
        while (true)
        {
            var e = await Qmp.NextEventAsync(TimeSpan.FromSeconds(60));
            var data = e["data"]!.AsObject();
            if (e["event"]!.GetValue<string>() == name && (string?)(data["id"] ?? data["device"]) == job)
            {
                return;
            }
        }
    }

    private async Task<JsonArray> NodesAsync() => (await ExecuteOkAsync("query-named-block-nodes"))["return"]!.AsArray();

    private async Task AddQcow2Async(string node, string file, string? backingNode = null, string size = "64M")
    {
        var path = Path.Combine(_dir, file);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", path, size);
        var options = new JsonObject
        {
            ["node-name"] = node, ["driver"] = "qcow2",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = path },
        };
        if (backingNode is not null)
        {
            options["backing"] = backingNode;
        }
        await ExecuteOkAsync("blockdev-add", options);
    }

    [Fact]
    public async Task Sync_none_fleecing_export_reads_the_disk_as_it_was_when_the_job_started()
    {
        await GuestWriteAsync(0x11, 0, 8 * MiB);
        await GuestWriteAsync(0x12, 20 * MiB, 3 * MiB);
        var atStart = await CopyExportAsync("drive0", "at-start.raw");

        // The temporary image reads through to the source until copy-before-write fills it.
        await AddQcow2Async("tmp0", "fleece.qcow2", backingNode: "drive0");
        await ExecuteOkAsync("blockdev-backup", new { device = "drive0", target = "tmp0", sync = "none", job_id = "fleece" }.ToQmp());
        await ExecuteOkAsync("block-export-add", new JsonObject
        {
            ["type"] = "nbd", ["id"] = "fl", ["node-name"] = "tmp0", ["name"] = "fleece", ["writable"] = false,
        });

        // The guest keeps writing: over data, over zeros, unaligned, and across cluster boundaries.
        await GuestWriteAsync(0x77, 0, MiB);
        await GuestWriteAsync(0x78, 20 * MiB + 4096, 70000);
        await GuestWriteAsync(0x79, 40 * MiB, 2 * MiB);
        await GuestWriteAsync(0x7a, 64 * MiB - 512, 512);

        var live = await CopyExportAsync("drive0", "live.raw");
        var fleeced = await CopyExportAsync("fleece", "fleeced.raw");
        await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", fleeced, atStart);
        // The guest's writes did land on the disk: otherwise this test could not fail.
        var liveBytes = await File.ReadAllBytesAsync(live);
        var startBytes = await File.ReadAllBytesAsync(atStart);
        liveBytes.SequenceEqual(startBytes).Should().BeFalse();
        // nbdcopy, another client, reads the same point in time.
        var viaNbdcopy = Path.Combine(_dir, "nbdcopy.raw");
        await Tool.RunAsync("nbdcopy", Uri("fleece"), viaNbdcopy);
        await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", viaNbdcopy, atStart);

        // sync=none copies nothing by itself: the job runs until it is cancelled.
        var jobs = (await ExecuteOkAsync("query-block-jobs"))["return"]!.AsArray();
        jobs.Should().ContainSingle().Which!["status"]!.GetValue<string>().Should().Be("running");
        jobs[0]!["len"]!.GetValue<long>().Should().Be(64 * MiB, "QSD counts the whole disk for sync=none");
        await ExecuteOkAsync("block-export-del", new { id = "fl" });
        await ExecuteOkAsync("block-job-cancel", new { device = "fleece" });
        await WaitForEventAsync("BLOCK_JOB_CANCELLED", "fleece");
        await WaitForJobGoneOrDelAsync("tmp0");
        (await NodesAsync()).Should().NotContain(n => n!["drv"]!.GetValue<string>() == "copy-before-write");
    }

    [Fact]
    public async Task Compressed_backup_is_clean_equal_and_smaller()
    {
        // Compressible clusters (one byte repeated), incompressible ones (random) and zeros.
        await GuestWriteAsync(0x5a, 0, 8 * MiB);
        var random = Path.Combine(_dir, "random.bin");
        await File.WriteAllBytesAsync(random, RandomBytes(2 * MiB));
        await Tool.RunAsync("qemu-io", "-f", "raw", Uri("drive0"), "-c", $"write -s {random} {16 * MiB} {2 * MiB}");
        await GuestWriteAsync(0x33, 64 * MiB - 65536, 65536);
        var atStart = await CopyExportAsync("drive0", "at-start.raw");

        await AddQcow2Async("t0", "compressed.qcow2");
        await ExecuteOkAsync("blockdev-backup", new { device = "drive0", target = "t0", sync = "full", job_id = "c", compress = true }.ToQmp());
        await WaitForEventAsync("BLOCK_JOB_COMPLETED", "c");
        await WaitForJobGoneOrDelAsync("t0");

        var image = Path.Combine(_dir, "compressed.qcow2");
        var check = await Tool.RunAsync("qemu-img", "check", image);
        check.Should().Contain("No errors were found on the image.");
        check.Should().MatchRegex(@"\d+(\.\d+)?% compressed clusters");
        check.Should().NotContain(" 0.00% compressed clusters");
        await Tool.RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, atStart);
        // 8 MiB of one byte compress to almost nothing; the 2 MiB of random data stay as they are.
        var info = JsonNode.Parse(await Tool.RunAsync("qemu-img", "info", "--output=json", image))!;
        info["actual-size"]!.GetValue<long>().Should().BeLessThan(4 * MiB);
        var map = JsonNode.Parse(await Tool.RunAsync("qemu-img", "map", "--output=json", image))!.AsArray();
        // Compressed clusters have no host offset in the map; the random ones keep theirs.
        map.Should().Contain(e => e!["data"]!.GetValue<bool>() && e["offset"] == null);
        map.Should().Contain(e => e!["data"]!.GetValue<bool>() && e["offset"] != null);
    }

    [Fact]
    public async Task Compress_into_a_target_that_cannot_store_compressed_clusters_is_refused_as_qsd()
    {
        var raw = Path.Combine(_dir, "t.raw");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", raw, "64M");
        await ExecuteOkAsync("blockdev-add", new JsonObject
        {
            ["node-name"] = "t0", ["driver"] = "raw", ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = raw },
        });
        (await ErrorOfAsync("blockdev-backup", new { device = "drive0", target = "t0", sync = "full", job_id = "c", compress = true }.ToQmp()))
            .Should().Be("Compression is not supported for this drive ");
        (await ExecuteOkAsync("query-block-jobs"))["return"]!.AsArray().Should().BeEmpty();
    }

    [Fact]
    public async Task The_copy_before_write_filter_is_a_node_while_the_job_runs_and_gone_afterwards()
    {
        await GuestWriteAsync(0x21, 0, 4 * MiB);
        await AddQcow2Async("t0", "t0.qcow2");
        await ExecuteOkAsync("blockdev-backup", new JsonObject
        {
            ["device"] = "drive0", ["target"] = "t0", ["sync"] = "full", ["job-id"] = "j", ["speed"] = 1,
            ["filter-node-name"] = "cbw0",
        });
        var filter = (await NodesAsync()).Single(n => n!["node-name"]!.GetValue<string>() == "cbw0")!;
        filter["drv"]!.GetValue<string>().Should().Be("copy-before-write");
        var source = (await NodesAsync()).Single(n => n!["node-name"]!.GetValue<string>() == "drive0")!;
        filter["file"]!.GetValue<string>().Should().Be(source["file"]!.GetValue<string>());
        filter["backing_file_depth"]!.GetValue<int>().Should().Be(1);
        filter["image"]!["format"]!.GetValue<string>().Should().Be("copy-before-write");
        filter["image"]!["backing-image"]!["format"]!.GetValue<string>().Should().Be("qcow2");
        // The name is taken while the filter exists.
        await AddQcow2Async("t1", "t1.qcow2");
        (await ErrorOfAsync("blockdev-backup", new JsonObject
        {
            ["device"] = "drive0", ["target"] = "t1", ["sync"] = "full", ["job-id"] = "j2", ["filter-node-name"] = "cbw0",
        })).Should().Be("Duplicate nodes with node-name='cbw0'");

        await ExecuteOkAsync("block-job-cancel", new { device = "j" });
        await WaitForEventAsync("BLOCK_JOB_CANCELLED", "j");
        (await NodesAsync()).Should().NotContain(n => n!["drv"]!.GetValue<string>() == "copy-before-write");

        // Without filter-node-name the filter gets a generated name, as in QSD.
        await ExecuteOkAsync("blockdev-backup", new JsonObject
        {
            ["device"] = "drive0", ["target"] = "t1", ["sync"] = "full", ["job-id"] = "j3", ["speed"] = 1,
        });
        (await NodesAsync()).Should().ContainSingle(n => n!["drv"]!.GetValue<string>() == "copy-before-write")
            .Which!["node-name"]!.GetValue<string>().Should().StartWith("#block");
        await ExecuteOkAsync("block-job-cancel", new { device = "j3" });
        await WaitForEventAsync("BLOCK_JOB_CANCELLED", "j3");
        (await NodesAsync()).Should().NotContain(n => n!["drv"]!.GetValue<string>() == "copy-before-write");
    }

    /// <summary>blockdev-del of a target right after its job completed: the job may still be finishing.</summary>
    private async Task WaitForJobGoneOrDelAsync(string node)
    {
        for (var i = 0; ; i++)
        {
            var reply = await Qmp.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = node });
            if (reply.ContainsKey("return"))
            {
                return;
            }
            i.Should().BeLessThan(500, reply.ToJsonString());
            await Task.Delay(10);
        }
    }

    private static byte[] RandomBytes(int n)
    {
        var b = new byte[n];
        new Random(42).NextBytes(b);
        return b;
    }
}

internal static class QmpArguments
{
    /// <summary>An anonymous object's properties as QMP arguments, job_id written job-id.</summary>
    public static JsonObject ToQmp(this object arguments)
    {
        var o = new JsonObject();
        foreach (var p in arguments.GetType().GetProperties())
        {
            o[p.Name.Replace('_', '-')] = p.GetValue(arguments) switch
            {
                bool b => JsonValue.Create(b),
                int i => JsonValue.Create(i),
                var v => JsonValue.Create((string?)v),
            };
        }
        return o;
    }
}
