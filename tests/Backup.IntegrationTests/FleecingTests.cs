using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Pull-mode backup (image fleecing), black box, with real appliances: nbdcopy and nbdinfo read the
/// point-in-time view over NBD while qemu-io writes to the live disk, and the result must equal a copy of
/// the disk taken at the instant (qemu-img compare). Both of QEMU's forms: a copy-before-write filter with
/// a snapshot-access node over it, and the classic sync=none backup into a qcow2 overlay whose backing is
/// the disk. Scenarios that QSD 7.2 can run are run against it too, with the same expectations.
/// </summary>
public sealed class FleecingTests
{
    private const int MiB = 1 << 20;
    private const string Qsd = "qemu-storage-daemon";

    private sealed class Setup : IAsyncDisposable
    {
        public required string Dir { get; init; }
        public required DaemonProcess Daemon { get; init; }
        public required QmpClient Qmp { get; init; }
        public List<JsonObject> Events { get; } = [];

        public string Socket => System.IO.Path.Combine(Dir, "nbd.sock");

        public string Path(string name) => System.IO.Path.Combine(Dir, name);

        public string Uri(string export) => $"nbd+unix:///{export}?socket={Socket}";

        public async Task<JsonNode?> OkAsync(string command, object? arguments = null)
        {
            var reply = await Qmp.ExecuteAsync(command, arguments);
            reply.Should().ContainKey("return", $"{command} {System.Text.Json.JsonSerializer.Serialize(arguments)}: {reply.ToJsonString()}");
            return reply["return"];
        }

        public async Task<string> ErrorAsync(string command, object arguments)
        {
            var reply = await Qmp.ExecuteAsync(command, arguments);
            reply.Should().ContainKey("error", reply.ToJsonString());
            return reply["error"]!["desc"]!.GetValue<string>();
        }

        /// <summary>qemu-io commands on an export: exit code and output.</summary>
        public async Task<(int Code, string Output)> IoAsync(string export, bool readOnly, params string[] commands)
        {
            var args = new List<string> { "-f", "raw" };
            if (readOnly)
            {
                args.Add("-r");
            }
            args.Add(Uri(export));
            foreach (var c in commands)
            {
                args.AddRange(["-c", c]);
            }
            var (code, stdout, stderr) = await Tool.RunWithExitCodeAsync("qemu-io", [.. args]);
            return (code, stdout + stderr);
        }

        public async Task ExportAsync(string id, string node, bool writable, JsonArray? bitmaps = null)
        {
            var args = new JsonObject { ["type"] = "nbd", ["id"] = id, ["name"] = id, ["node-name"] = node, ["writable"] = writable };
            if (bitmaps is not null)
            {
                args["bitmaps"] = bitmaps;
            }
            await OkAsync("block-export-add", args);
        }

        /// <summary>Removes an export and waits for its BLOCK_EXPORT_DELETED.</summary>
        public async Task UnexportAsync(string id)
        {
            await OkAsync("block-export-del", new JsonObject { ["id"] = id });
            await WaitEventAsync("BLOCK_EXPORT_DELETED", e => e["data"]!["id"]!.GetValue<string>() == id);
        }

        public async Task<JsonObject> WaitEventAsync(string name, Func<JsonObject, bool>? match = null)
        {
            while (true)
            {
                var e = await Qmp.NextEventAsync(TimeSpan.FromSeconds(60));
                Events.Add(e);
                if (e["event"]!.GetValue<string>() == name && (match is null || match(e)))
                {
                    return e;
                }
            }
        }

        public async Task<string[]> NodeNamesAsync() =>
            [.. (await OkAsync("query-named-block-nodes"))!.AsArray().Select(n => n!["node-name"]!.GetValue<string>()).Order(StringComparer.Ordinal)];

        public async Task<long> BitmapCountAsync(string node, string name) =>
            (await OkAsync("query-named-block-nodes"))!.AsArray().Single(n => n!["node-name"]!.GetValue<string>() == node)!["dirty-bitmaps"]!
                .AsArray().Single(b => b!["name"]?.GetValue<string>() == name)!["count"]!.GetValue<long>();

        public ValueTask DisposeAsync() => new(DaemonProcess.ShutdownAsync(Qmp, Daemon));
    }

    /// <summary>
    /// A daemon over a 16 MiB raw disk (node src): 0x11 in its first 12 MiB, a hole after. A bitmap b0
    /// records two writes made through an export of src (1 MiB at 1 MiB, 64 KiB at 5 MiB).
    /// </summary>
    private static async Task<Setup> StartAsync(string daemon)
    {
        var dir = DaemonProcess.NewDirectory();
        var src = System.IO.Path.Combine(dir, "src.img");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", src, "16M");
        await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 12M", src);
        var d = await DaemonProcess.StartAsync(
        [
            "--blockdev", $"driver=file,node-name=srcf,filename={src}",
            "--blockdev", "driver=raw,node-name=src,file=srcf",
            "--nbd-server", $"addr.type=unix,addr.path={System.IO.Path.Combine(dir, "nbd.sock")}",
        ], dir, executable: daemon == Qsd ? Qsd : null);
        var s = new Setup { Dir = dir, Daemon = d, Qmp = await d.ConnectAsync() };
        await s.OkAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = "src", ["name"] = "b0" });
        await s.ExportAsync("pre", "src", writable: true);
        (await s.IoAsync("pre", false, "write -P 0x22 1M 1M", "write -P 0x23 5M 64k")).Code.Should().Be(0);
        await s.UnexportAsync("pre");
        return s;
    }

    /// <summary>A fleecing image: a qcow2 of the disk's size, no backing, opened with discard=unmap.</summary>
    private static async Task AddFleecingImageAsync(Setup s, string node = "tgt")
    {
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", s.Path("fleece.qcow2"), "16M");
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = node, ["discard"] = "unmap",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("fleece.qcow2") },
        });
    }

    /// <summary>The guest's writes during the pull: data, zeros and a write into the hole.</summary>
    private static readonly string[] GuestWrites =
    [
        "write -P 0x33 0 3M", "write -P 0x34 4M 2M", "write -z 8M 1M", "write -P 0x35 13M 1M", "write -P 0x36 1M 64k",
    ];

    /// <summary>
    /// The writes a view of <paramref name="daemon"/> stands. QSD 7.2's snapshot-access reports a range
    /// the guest zeroed after the instant as a hole (its reads are right), so nbdcopy, which skips holes,
    /// pulls zeros there: without the zero write for QSD.
    /// </summary>
    private static string[] GuestWritesFor(string daemon, bool snapshotAccess) =>
        daemon == Qsd && snapshotAccess ? [.. GuestWrites.Where(w => !w.StartsWith("write -z", StringComparison.Ordinal))] : GuestWrites;

    /// <summary>nbdcopy of the view while qemu-io writes to the live export; the copy must be the reference.</summary>
    private static async Task PullDuringWritesAsync(Setup s, string view, string live, string reference, string[] guestWrites)
    {
        var pulled = s.Path("pulled.raw");
        var copy = Tool.RunAsync("nbdcopy", s.Uri(view), pulled);
        var writes = s.IoAsync(live, false, guestWrites);
        await Task.WhenAll(copy, writes);
        (await writes).Code.Should().Be(0, (await writes).Output);
        (await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", pulled, reference)).Should().Contain("Images are identical.");
        // After the writes too: the view does not move.
        File.Delete(pulled);
        await Tool.RunAsync("nbdcopy", s.Uri(view), pulled);
        (await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", pulled, reference)).Should().Contain("Images are identical.");
        (await s.IoAsync(live, true, "read -P 0x33 0 1M", "read -P 0x36 1M 64k", "read -P 0x35 13M 1M")).Code.Should().Be(0, "the live disk has the writes");
    }

    /// <summary>nbdinfo --map of b0 on the view: dirty exactly where the writes before the instant went.</summary>
    private static async Task CheckBitmapMapAsync(Setup s, string view)
    {
        var map = await Tool.RunAsync("nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", s.Uri(view));
        var dirty = JsonNode.Parse(map)!.AsArray().Where(e => e!["type"]!.GetValue<int>() == 1)
            .Select(e => (e!["offset"]!.GetValue<long>(), e["length"]!.GetValue<long>()));
        dirty.Should().Equal([(1L * MiB, 1L * MiB), (5L * MiB, 65536L)], map);
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData(Qsd)]
    public async Task A_snapshot_access_view_stays_the_instant_while_the_guest_writes(string daemon)
    {
        await using var s = await StartAsync(daemon);
        await AddFleecingImageAsync(s);
        // The instant: the filter's creation. Then the bitmap is frozen and a new one records from here.
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "copy-before-write", ["node-name"] = "cbw", ["file"] = "src", ["target"] = "tgt" });
        var reference = s.Path("reference.raw");
        File.Copy(s.Path("src.img"), reference);
        await s.OkAsync("transaction", new JsonObject
        {
            ["actions"] = new JsonArray(
                new JsonObject { ["type"] = "block-dirty-bitmap-add", ["data"] = new JsonObject { ["node"] = "src", ["name"] = "next" } },
                new JsonObject { ["type"] = "block-dirty-bitmap-disable", ["data"] = new JsonObject { ["node"] = "src", ["name"] = "b0" } }),
        });
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "snapshot-access", ["node-name"] = "acc", ["file"] = "cbw" });
        // A bare name is looked up on the exported node and its backing chain only, which acc has none of.
        (await s.ErrorAsync("block-export-add", new JsonObject
        {
            ["type"] = "nbd", ["id"] = "v2", ["node-name"] = "acc", ["name"] = "v2", ["bitmaps"] = new JsonArray("b0"),
        })).Should().Be("Bitmap 'b0' is not found");
        await s.ExportAsync("view", "acc", writable: false, new JsonArray(new JsonObject { ["node"] = "src", ["name"] = "b0" }));
        await s.ExportAsync("live", "cbw", writable: true);

        await CheckBitmapMapAsync(s, "view");
        await PullDuringWritesAsync(s, "view", "live", reference, GuestWritesFor(daemon, snapshotAccess: true));

        // Teardown in the order an appliance leaves: export, view, filter, image; nothing is left behind.
        await s.UnexportAsync("view");
        (await s.ErrorAsync("blockdev-del", new JsonObject { ["node-name"] = "cbw" })).Should().Be("Node cbw is in use");
        await s.UnexportAsync("live");
        (await s.ErrorAsync("blockdev-del", new JsonObject { ["node-name"] = "cbw" })).Should().Be("Block device cbw is in use");
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "acc" });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "cbw" });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "tgt" });
        (await s.NodeNamesAsync()).Should().Equal("src", "srcf");

        // The pull is abandoned: merging b0 back into next loses nothing for the next backup.
        await s.OkAsync("block-dirty-bitmap-merge", new JsonObject { ["node"] = "src", ["target"] = "next", ["bitmaps"] = new JsonArray("b0") });
        await s.OkAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = "src", ["name"] = "b0" });
        // b0's 1 MiB + 64 KiB, and the guest's writes: 0-3M, 4-6M, 8-9M (not on QSD), 13-14M (1M+64k and 5M are inside).
        (await s.BitmapCountAsync("src", "next")).Should().Be((daemon == Qsd ? 6L : 7L) * MiB);
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData(Qsd)]
    public async Task The_classic_sync_none_overlay_is_a_point_in_time_view_taken_in_one_transaction(string daemon)
    {
        await using var s = await StartAsync(daemon);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", "-b", s.Path("src.img"), "-F", "raw", s.Path("overlay.qcow2"));
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "ov", ["backing"] = "src",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("overlay.qcow2") },
        });
        await s.ExportAsync("live", "src", writable: true);
        var reference = s.Path("reference.raw");
        File.Copy(s.Path("src.img"), reference);
        await s.OkAsync("transaction", new JsonObject
        {
            ["actions"] = new JsonArray(
                new JsonObject { ["type"] = "block-dirty-bitmap-add", ["data"] = new JsonObject { ["node"] = "src", ["name"] = "next" } },
                new JsonObject { ["type"] = "block-dirty-bitmap-disable", ["data"] = new JsonObject { ["node"] = "src", ["name"] = "b0" } },
                new JsonObject
                {
                    ["type"] = "blockdev-backup",
                    ["data"] = new JsonObject { ["job-id"] = "fleece", ["device"] = "src", ["target"] = "ov", ["sync"] = "none" },
                }),
        });
        // The bare name is found down the overlay's backing chain.
        await s.ExportAsync("view", "ov", writable: false, new JsonArray("b0"));

        await CheckBitmapMapAsync(s, "view");
        await PullDuringWritesAsync(s, "view", "live", reference, GuestWritesFor(daemon, snapshotAccess: false));

        await s.UnexportAsync("view");
        await s.OkAsync("block-job-cancel", new JsonObject { ["device"] = "fleece" });
        await s.WaitEventAsync("BLOCK_JOB_CANCELLED", e => e["data"]!["device"]!.GetValue<string>() == "fleece");
        await s.WaitEventAsync("JOB_STATUS_CHANGE", e => e["data"]!["status"]!.GetValue<string>() == "null");
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "ov" });
        await s.UnexportAsync("live");
        (await s.NodeNamesAsync()).Should().Equal("src", "srcf");
    }

    /// <summary>A raw fleecing target whose writes fail once (blkdebug), as QEMU's tests make one.</summary>
    private static JsonObject FailingOnceTarget(Setup s) => new()
    {
        ["driver"] = "raw",
        ["file"] = new JsonObject
        {
            ["driver"] = "blkdebug",
            ["image"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("fleece.img") },
            ["inject-error"] = new JsonArray(new JsonObject
            {
                ["event"] = "write_aio", ["errno"] = 5, ["immediately"] = false, ["once"] = true,
            }),
        },
    };

    [Theory]
    [InlineData("backupd", "break-guest-write")]
    [InlineData("backupd", "break-snapshot")]
    [InlineData(Qsd, "break-guest-write")]
    [InlineData(Qsd, "break-snapshot")]
    public async Task A_failed_copy_fails_the_guest_write_or_the_view_by_on_cbw_error(string daemon, string mode)
    {
        await using var s = await StartAsync(daemon);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", s.Path("fleece.img"), "16M");
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "copy-before-write", ["node-name"] = "cbw", ["file"] = "src", ["on-cbw-error"] = mode, ["target"] = FailingOnceTarget(s),
        });
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "snapshot-access", ["node-name"] = "acc", ["file"] = "cbw" });
        await s.ExportAsync("view", "acc", writable: false);
        await s.ExportAsync("live", "cbw", writable: true);
        var write = await s.IoAsync("live", false, "write -P 0x44 64k 64k");
        if (mode == "break-guest-write")
        {
            write.Should().Be((1, "write failed: Input/output error\n"));
            (await s.IoAsync("view", true, "read -P 0x11 0 1M", "read -P 0x22 1M 1M", "read -P 0x11 2M 3M", "read -P 0 12M 4M")).Code.Should().Be(0, "the snapshot is whole");
            // The next write copies, and the view still shows the old data.
            (await s.IoAsync("live", false, "write -P 0x44 64k 64k")).Code.Should().Be(0);
            (await s.IoAsync("view", true, "read -P 0x11 64k 64k")).Code.Should().Be(0);
        }
        else
        {
            write.Code.Should().Be(0, write.Output);
            (await s.IoAsync("view", true, "read 0 64k")).Should().Be((1, "read failed: Invalid argument\n"));
            (await s.IoAsync("view", true, "read 8M 64k")).Should().Be((1, "read failed: Invalid argument\n"));
            var map = await Tool.RunWithExitCodeAsync("nbdinfo", "--map", s.Uri("view"));
            map.ExitCode.Should().Be(1);
            map.Stderr.Should().Contain("block-status: command failed: Invalid argument");
            (await s.IoAsync("live", true, "read -P 0x44 64k 64k")).Code.Should().Be(0, "the guest write went on");
        }
        await s.UnexportAsync("view");
        await s.UnexportAsync("live");
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "acc" });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "cbw" });
    }

    /// <summary>
    /// cbw-timeout with break-snapshot: a guest write whose copy takes longer (a target with 3 s latency)
    /// goes on after the timeout, and the view can no longer be read.
    /// </summary>
    [Theory]
    [InlineData("backupd")]
    [InlineData(Qsd)]
    public async Task A_copy_that_times_out_breaks_the_view_with_break_snapshot(string daemon)
    {
        await using var s = await StartAsync(daemon);
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "copy-before-write", ["node-name"] = "cbw", ["file"] = "src", ["on-cbw-error"] = "break-snapshot", ["cbw-timeout"] = 1,
            ["target"] = new JsonObject { ["driver"] = "null-co", ["size"] = 16 * MiB, ["latency-ns"] = 3_000_000_000L },
        });
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "snapshot-access", ["node-name"] = "acc", ["file"] = "cbw" });
        await s.ExportAsync("view", "acc", writable: false);
        await s.ExportAsync("live", "cbw", writable: true);
        (await s.IoAsync("view", true, "read -P 0x11 0 64k")).Code.Should().Be(0, "not copied yet: read from the disk");
        var watch = System.Diagnostics.Stopwatch.StartNew();
        (await s.IoAsync("live", false, "write -P 0x44 0 64k")).Code.Should().Be(0);
        watch.Elapsed.Should().BeGreaterThan(TimeSpan.FromMilliseconds(900)).And.BeLessThan(TimeSpan.FromMilliseconds(2900));
        (await s.IoAsync("view", true, "read 1M 64k")).Should().Be((1, "read failed: Invalid argument\n"));
        await s.UnexportAsync("view");
        await s.UnexportAsync("live");
    }

    /// <summary>
    /// The appliance discards what it has read: the view forgets those clusters (reads there fail, guest
    /// writes no longer copy them) and the fleecing image gives their space back. QSD 7.2 aborts on a
    /// discard of a snapshot-access node (an hbitmap assertion), so this runs against backupd only.
    /// </summary>
    [Fact]
    public async Task Discards_of_the_view_free_the_fleecing_image()
    {
        await using var s = await StartAsync("backupd");
        await AddFleecingImageAsync(s);
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "copy-before-write", ["node-name"] = "cbw", ["file"] = "src", ["target"] = "tgt" });
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "snapshot-access", ["node-name"] = "acc", ["file"] = "cbw", ["discard"] = "unmap" });
        await s.ExportAsync("view", "acc", writable: true);
        await s.ExportAsync("live", "cbw", writable: true);
        (await s.IoAsync("live", false, "write -P 0x44 0 4M")).Code.Should().Be(0);
        (await FleeceDataAsync(s)).Should().Be(4L * MiB, "copy-before-write saved the old data");

        (await s.IoAsync("view", false, "read 0 4M", "discard 0 3M", "discard 3M 32k")).Code.Should().Be(0);
        (await FleeceDataAsync(s)).Should().Be(1L * MiB, "whole clusters only: 3M-3M+32k stays");
        (await s.IoAsync("view", true, "read 0 64k")).Should().Be((1, "read failed: Invalid argument\n"));
        (await s.IoAsync("view", true, "read -P 0x11 3M 1M", "read -P 0x11 4M 1M", "read -P 0x11 6M 6M")).Code.Should().Be(0);
        // Discarded clusters are no longer copied before a write.
        (await s.IoAsync("live", false, "write -P 0x45 0 3M")).Code.Should().Be(0);
        (await FleeceDataAsync(s)).Should().Be(1L * MiB);
        // Writes to the view are refused as QEMU refuses them.
        (await s.IoAsync("view", false, "write -P 0x55 8M 4k")).Output.Should().Contain("write failed: Operation not supported");
        await s.UnexportAsync("view");
        await s.UnexportAsync("live");
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "acc" });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "cbw" });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "tgt" });
        (await Tool.RunWithExitCodeAsync("qemu-img", "check", s.Path("fleece.qcow2"))).ExitCode.Should().Be(0);
    }

    /// <summary>Bytes of the fleecing image that hold data, as qemu-img map sees them (-U: the daemon has it open).</summary>
    private static async Task<long> FleeceDataAsync(Setup s)
    {
        var map = await Tool.RunAsync("qemu-img", "map", "-U", "--output=json", "-f", "qcow2", s.Path("fleece.qcow2"));
        return JsonNode.Parse(map)!.AsArray().Where(e => e!["data"]!.GetValue<bool>()).Sum(e => e!["length"]!.GetValue<long>());
    }

    /// <summary>
    /// Push backup from the fleecing view with discard-source (upstream QEMU's option, an extension here):
    /// the job copies the view to a backup image and gives back the fleecing image's space as it goes.
    /// </summary>
    [Fact]
    public async Task A_push_backup_of_the_view_with_discard_source_empties_the_fleecing_image()
    {
        await using var s = await StartAsync("backupd");
        await AddFleecingImageAsync(s);
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "copy-before-write", ["node-name"] = "cbw", ["file"] = "src", ["target"] = "tgt" });
        var reference = s.Path("reference.raw");
        File.Copy(s.Path("src.img"), reference);
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "snapshot-access", ["node-name"] = "acc", ["file"] = "cbw", ["discard"] = "unmap" });
        await s.ExportAsync("live", "cbw", writable: true);
        (await s.IoAsync("live", false, GuestWrites)).Code.Should().Be(0);
        (await FleeceDataAsync(s)).Should().BeGreaterThan(0);

        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", s.Path("backup.qcow2"), "16M");
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "bk",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("backup.qcow2") },
        });
        await s.OkAsync("blockdev-backup", new JsonObject
        {
            ["job-id"] = "push", ["device"] = "acc", ["target"] = "bk", ["sync"] = "full", ["discard-source"] = true,
        });
        var done = await s.WaitEventAsync("BLOCK_JOB_COMPLETED");
        done["data"]!.AsObject().Should().NotContainKey("error");
        await s.WaitEventAsync("JOB_STATUS_CHANGE", e => e["data"]!["status"]!.GetValue<string>() == "null");
        (await FleeceDataAsync(s)).Should().Be(0, "every copied range was discarded on the view");
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "bk" });
        (await Tool.RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", s.Path("backup.qcow2"), reference)).Should().Contain("Images are identical.");
        await s.UnexportAsync("live");
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "acc" });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "cbw" });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "tgt" });
    }
}
