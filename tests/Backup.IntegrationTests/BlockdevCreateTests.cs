using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// blockdev-create against the real daemon, checked the way QSD 7.2 behaves (events, query-jobs,
/// job-dismiss, error texts), and the images it writes checked with qemu-img info/check/compare.
/// </summary>
public sealed class BlockdevCreateTests : IAsyncLifetime
{
    private string _dir = "";
    private DaemonProcess? _daemon;
    private QmpClient? _qmp;

    private QmpClient Qmp => _qmp!;

    public async Task InitializeAsync()
    {
        _dir = DaemonProcess.NewDirectory();
        _daemon = await DaemonProcess.StartAsync([], _dir);
        _qmp = await _daemon.ConnectAsync();
    }

    public Task DisposeAsync() => DaemonProcess.ShutdownAsync(_qmp, _daemon);

    private string PathOf(string name) => Path.Combine(_dir, name);

    private async Task<JsonObject> OkAsync(string command, object arguments)
    {
        var reply = await Qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("return", reply.ToJsonString());
        return reply;
    }

    /// <summary>Runs blockdev-create to 'concluded' and returns the status sequence and the job's query-jobs entry; dismisses it.</summary>
    private async Task<(string Sequence, JsonObject Info)> CreateAsync(string id, JsonObject options)
    {
        await OkAsync("blockdev-create", new JsonObject { ["job-id"] = id, ["options"] = options });
        var statuses = new List<string>();
        while (true)
        {
            var e = await Qmp.NextEventAsync(TimeSpan.FromSeconds(60));
            e["event"]!.GetValue<string>().Should().Be("JOB_STATUS_CHANGE", "a create job is not a block job");
            if (e["data"]!["id"]!.GetValue<string>() != id)
            {
                continue;
            }
            var status = e["data"]!["status"]!.GetValue<string>();
            statuses.Add(status);
            if (status == "concluded")
            {
                break;
            }
        }
        var jobs = (await Qmp.ExecuteAsync("query-jobs"))["return"]!.AsArray();
        var info = jobs.Single(j => j!["id"]!.GetValue<string>() == id)!.AsObject();
        (await Qmp.ExecuteAsync("query-block-jobs"))["return"]!.AsArray().Should().BeEmpty();
        await OkAsync("job-dismiss", new { id });
        var dismissed = await Qmp.NextEventAsync(TimeSpan.FromSeconds(10));
        dismissed["data"]!["status"]!.GetValue<string>().Should().Be("null");
        return (string.Join(' ', statuses), info);
    }

    private async Task CreateOkAsync(string id, JsonObject options)
    {
        var (sequence, info) = await CreateAsync(id, options);
        info.ContainsKey("error").Should().BeFalse(info.ToJsonString());
        sequence.Should().Be("created running waiting pending concluded");
    }

    private async Task<string> CreateFailsAsync(string id, JsonObject options)
    {
        var (sequence, info) = await CreateAsync(id, options);
        sequence.Should().Be("created running aborting concluded");
        info["current-progress"]!.GetValue<long>().Should().Be(1);
        info["total-progress"]!.GetValue<long>().Should().Be(1);
        return info["error"]!.GetValue<string>();
    }

    private static JsonObject FileOptions(string path, long size) =>
        new() { ["driver"] = "file", ["filename"] = path, ["size"] = size };

    private async Task AddFileAsync(string node, string path) =>
        await OkAsync("blockdev-add", new JsonObject { ["driver"] = "file", ["node-name"] = node, ["filename"] = path });

    private static Task<string> InfoAsync(string path) => Tool.RunAsync("qemu-img", "info", "--output=json", path);

    private static Task<string> CheckAsync(string path) => Tool.RunAsync("qemu-img", "check", path);

    [Fact]
    public async Task File_then_qcow2_as_in_qsd_then_blockdev_add_and_write_the_result()
    {
        var path = PathOf("new.qcow2");
        var (sequence, info) = await CreateAsync("c0", FileOptions(path, 0));
        sequence.Should().Be("created running waiting pending concluded");
        info.ToJsonString().Should().Be("""{"id":"c0","type":"create","status":"concluded","current-progress":1,"total-progress":1}""");
        File.Exists(path).Should().BeTrue();

        await AddFileAsync("f0", path);
        await CreateOkAsync("c1", new JsonObject { ["driver"] = "qcow2", ["file"] = "f0", ["size"] = 64L << 20 });
        var qemuInfo = JsonNode.Parse(await InfoAsync(path))!;
        qemuInfo["format"]!.GetValue<string>().Should().Be("qcow2");
        qemuInfo["virtual-size"]!.GetValue<long>().Should().Be(64L << 20);
        qemuInfo["cluster-size"]!.GetValue<long>().Should().Be(65536);
        await CheckAsync(path);

        await OkAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = "q0", ["file"] = "f0" });
        await OkAsync("human-monitor-command", new JsonObject { ["command-line"] = "qemu-io q0 \"write -P 0x5a 1M 3M\"" });
        await OkAsync("blockdev-del", new JsonObject { ["node-name"] = "q0" });
        await OkAsync("blockdev-del", new JsonObject { ["node-name"] = "f0" });
        await CheckAsync(path);
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 3M", "-c", "read -P 0 0 1M", path);
    }

    [Fact]
    public async Task Qcow2_options_reach_the_image()
    {
        var backing = PathOf("base.qcow2");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", backing, "32M");
        var path = PathOf("top.qcow2");
        await CreateOkAsync("f", FileOptions(path, 0));
        await AddFileAsync("f0", path);
        await CreateOkAsync("c", new JsonObject
        {
            ["driver"] = "qcow2", ["file"] = "f0", ["size"] = 32L << 20, ["cluster-size"] = 4096, ["backing-file"] = "base.qcow2",
            ["backing-fmt"] = "qcow2", ["lazy-refcounts"] = true, ["refcount-bits"] = 8,
        });
        var info = JsonNode.Parse(await InfoAsync(path))!;
        info["cluster-size"]!.GetValue<long>().Should().Be(4096);
        info["backing-filename"]!.GetValue<string>().Should().Be("base.qcow2");
        info["backing-filename-format"]!.GetValue<string>().Should().Be("qcow2");
        var specific = info["format-specific"]!["data"]!;
        specific["lazy-refcounts"]!.GetValue<bool>().Should().BeTrue();
        specific["refcount-bits"]!.GetValue<long>().Should().Be(8);
        await CheckAsync(path);

        var v2 = PathOf("v2.qcow2");
        await CreateOkAsync("f2", FileOptions(v2, 0));
        await AddFileAsync("f2", v2);
        await CreateOkAsync("c2", new JsonObject
        {
            ["driver"] = "qcow2", ["file"] = "f2", ["size"] = 16L << 20, ["version"] = "v2", ["preallocation"] = "metadata",
        });
        info = JsonNode.Parse(await InfoAsync(v2))!;
        info["format-specific"]!["data"]!["compat"]!.GetValue<string>().Should().Be("0.10");
        var check = await Tool.RunAsync("qemu-img", "check", "--output=json", v2);
        JsonNode.Parse(check)!["allocated-clusters"]!.GetValue<long>().Should().Be(256, "metadata preallocation maps every cluster");
    }

    [Fact]
    public async Task Bad_options_fail_in_the_job_with_qsd_texts()
    {
        var path = PathOf("x.qcow2");
        await CreateOkAsync("f", FileOptions(path, 0));
        await AddFileAsync("f0", path);
        JsonObject Q(params (string Key, JsonNode? Value)[] extra)
        {
            var o = new JsonObject { ["driver"] = "qcow2", ["file"] = "f0", ["size"] = 1L << 20 };
            foreach (var (k, v) in extra)
            {
                o[k] = v;
            }
            return o;
        }
        (await CreateFailsAsync("e1", Q(("size", 1000)))).Should().Be("Image size must be a multiple of 512 bytes");
        (await CreateFailsAsync("e2", Q(("cluster-size", 1000)))).Should().Be("Cluster size must be a power of two between 512 and 2048k");
        (await CreateFailsAsync("e3", Q(("version", "v2"), ("lazy-refcounts", true))))
            .Should().Be("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        (await CreateFailsAsync("e4", Q(("refcount-bits", 3)))).Should().Be("Refcount width must be a power of two and may not exceed 64 bits");
        (await CreateFailsAsync("e5", Q(("backing-fmt", "raw")))).Should().Be("Backing format cannot be used without backing file");
        (await CreateFailsAsync("e6", Q(("data-file-raw", true)))).Should().Be("data-file-raw requires data-file");
        (await CreateFailsAsync("e7", Q(("file", "nope")))).Should().Be("Cannot find device='nope' nor node-name='nope'");
        (await CreateFailsAsync("e8", Q(("size", -512)))).Should().Be("Could not resize image: Image size cannot be negative");
        (await CreateFailsAsync("e9", FileOptions("/nonexistent-dir/x", 0))).Should().Be("Could not create '/nonexistent-dir/x': No such file or directory");

        await CreateOkAsync("ok", Q());
        await OkAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = "busy", ["file"] = "f0" });
        (await CreateFailsAsync("e10", Q())).Should().Be("Permission conflict on node 'f0': permissions 'write, resize' are both " +
            "required by an unnamed block device (uses node 'f0' as 'root' child) and unshared by node 'busy' (uses node 'f0' as 'file' child).");

        var raw = await Qmp.ExecuteAsync("blockdev-create", new JsonObject { ["job-id"] = "r", ["options"] = new JsonObject { ["driver"] = "raw" } });
        raw["error"]!["desc"]!.GetValue<string>().Should().Be("Driver does not support blockdev-create");
        var missing = await Qmp.ExecuteAsync("blockdev-create", new JsonObject { ["options"] = FileOptions(path, 0) });
        missing["error"]!["desc"]!.GetValue<string>().Should().Be("Parameter 'job-id' is missing");
    }

    [Fact]
    public async Task Raw_external_data_file_stays_plain_raw_and_qemu_img_agrees()
    {
        var meta = PathOf("meta.qcow2");
        var data = PathOf("data.raw");
        await CreateOkAsync("m", FileOptions(meta, 0));
        await CreateOkAsync("d", FileOptions(data, 0));
        await AddFileAsync("fm", meta);
        await AddFileAsync("fd", data);
        await CreateOkAsync("c", new JsonObject
        {
            ["driver"] = "qcow2", ["file"] = "fm", ["size"] = 32L << 20, ["data-file"] = "fd", ["data-file-raw"] = true,
        });
        var specific = JsonNode.Parse(await InfoAsync(meta))!["format-specific"]!["data"]!;
        specific["data-file"]!.GetValue<string>().Should().Be(data);
        specific["data-file-raw"]!.GetValue<bool>().Should().BeTrue();
        new FileInfo(data).Length.Should().Be(32L << 20);

        await OkAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = "q", ["file"] = "fm", ["data-file"] = "fd" });
        foreach (var cmd in new[] { "write -P 0x11 0 1M", "write -P 0x22 70000 5000", "write -z 8M 1M", "write -P 0x33 31M 1M" })
        {
            await OkAsync("human-monitor-command", new JsonObject { ["command-line"] = $"qemu-io q \"{cmd}\"" });
        }
        var nodes = (await Qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        var q = nodes.Single(n => n!["node-name"]!.GetValue<string>() == "q")!;
        q["image"]!["format-specific"]!["data"]!["data-file-raw"]!.GetValue<bool>().Should().BeTrue();
        await OkAsync("blockdev-del", new JsonObject { ["node-name"] = "q" });
        await OkAsync("blockdev-del", new JsonObject { ["node-name"] = "fm" });
        await OkAsync("blockdev-del", new JsonObject { ["node-name"] = "fd" });

        await CheckAsync(meta);
        // The data file alone is the disk: the qcow2 view and the plain raw file are identical.
        await Tool.RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", meta, data);
        await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "read -P 0x11 0 70000", "-c", "read -P 0x22 70000 5000",
            "-c", "read -P 0x11 75000 973576", "-c", "read -P 0 8M 1M", "-c", "read -P 0x33 31M 1M", data);
    }

    [Fact]
    public async Task Metadata_image_over_an_existing_raw_disk_keeps_its_data_as_qsd_does()
    {
        // What data-file-raw is for: a raw disk gets a qcow2 metadata image (for persistent bitmaps) without a copy.
        var disk = PathOf("disk.raw");
        var meta = PathOf("disk.qcow2");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", disk, "8M");
        await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "write -P 0x66 1M 1M", "-c", "write -P 0x67 7M 4k", disk);
        await CreateOkAsync("m", FileOptions(meta, 0));
        await AddFileAsync("fm", meta);
        await AddFileAsync("fd", disk);
        await CreateOkAsync("c", new JsonObject
        {
            ["driver"] = "qcow2", ["file"] = "fm", ["size"] = 8L << 20, ["data-file"] = "fd", ["data-file-raw"] = true,
        });
        await OkAsync("blockdev-del", new JsonObject { ["node-name"] = "fm" });
        await OkAsync("blockdev-del", new JsonObject { ["node-name"] = "fd" });
        await CheckAsync(meta);
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-c", "read -P 0x66 1M 1M", "-c", "read -P 0x67 7M 4k", "-c", "read -P 0 0 1M", meta);
        await Tool.RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", meta, disk);
    }

    [Fact]
    public async Task Image_made_by_qemu_img_with_a_raw_data_file_opens_by_its_header_name_and_stays_clean()
    {
        var meta = PathOf("qmeta.qcow2");
        var data = PathOf("qdata.raw");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", "-o", $"data_file={data},data_file_raw=on", meta, "16M");
        await OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "q", ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = meta },
        });
        await OkAsync("human-monitor-command", new JsonObject { ["command-line"] = "qemu-io q \"write -P 0x7c 100000 300000\"" });
        await OkAsync("human-monitor-command", new JsonObject { ["command-line"] = "qemu-io q \"write -z 1M 64k\"" });
        var nodes = (await Qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        nodes.Should().Contain(n => n!["drv"]!.GetValue<string>() == "file" && n["file"]!.GetValue<string>() == data,
            "the data file named in the header is opened as a file node");
        await OkAsync("blockdev-del", new JsonObject { ["node-name"] = "q" });
        await CheckAsync(meta);
        await Tool.RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", meta, data);
        await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "read -P 0x7c 100000 300000", "-c", "read -P 0 0 100000", data);
    }
}
