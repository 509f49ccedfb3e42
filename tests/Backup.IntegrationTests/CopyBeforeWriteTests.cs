using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// A user-added copy-before-write filter (blockdev-add driver=copy-before-write), black box, in the shape
/// of QEMU 7.2's copy-before-write and 283 iotests. Every scenario runs against backupd and against
/// qemu-storage-daemon with the same expectations: guest data goes through an NBD export of the filter
/// (QSD has no human-monitor-command), and the target is read back with qemu-io once the daemon let go.
/// </summary>
public sealed class CopyBeforeWriteTests
{
    private const int MiB = 1 << 20;
    private const string Qsd = "qemu-storage-daemon";

    /// <summary>A daemon over a 1 MiB raw source full of 0x11 (node src), with an NBD server.</summary>
    private sealed class Setup : IAsyncDisposable
    {
        public required string Dir { get; init; }
        public required DaemonProcess Daemon { get; init; }
        public required QmpClient Qmp { get; init; }

        public string Socket => System.IO.Path.Combine(Dir, "nbd.sock");

        public string Path(string name) => System.IO.Path.Combine(Dir, name);

        public async Task<JsonObject> OkAsync(string command, object? arguments = null)
        {
            var reply = await Qmp.ExecuteAsync(command, arguments);
            reply.Should().ContainKey("return", $"{command} {System.Text.Json.JsonSerializer.Serialize(arguments)}: {reply.ToJsonString()}");
            return reply;
        }

        public async Task<string> ErrorAsync(string command, object arguments)
        {
            var reply = await Qmp.ExecuteAsync(command, arguments);
            reply.Should().ContainKey("error", reply.ToJsonString());
            return reply["error"]!["desc"]!.GetValue<string>();
        }

        /// <summary>One qemu-io command on an export: its exit code and first line of output.</summary>
        public async Task<(int Code, string Line)> IoAsync(string export, string command)
        {
            var (code, stdout, stderr) = await Tool.RunWithExitCodeAsync("qemu-io", "-f", "raw",
                $"nbd+unix:///{export}?socket={Socket}", "-c", command);
            return (code, (stdout + stderr).Split('\n')[0]);
        }

        public async Task ExportAsync(string node) =>
            await OkAsync("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = "e-" + node, ["node-name"] = node, ["writable"] = true });

        /// <summary>Removes an export and then the node; the export may take a moment to let go of it.</summary>
        public async Task UnexportAndDeleteAsync(string node)
        {
            await OkAsync("block-export-del", new JsonObject { ["id"] = "e-" + node });
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

        public async Task<JsonObject> NodeAsync(string name) =>
            (await OkAsync("query-named-block-nodes"))["return"]!.AsArray()
                .Single(n => n!["node-name"]!.GetValue<string>() == name)!.AsObject();

        /// <summary>The counts of a node's nameless bitmaps, in the order the query lists them.</summary>
        public async Task<long[]> NamelessCountsAsync(string node) =>
            (await NodeAsync(node))["dirty-bitmaps"]?.AsArray().Where(b => b!["name"] is null)
                .Select(b => b!["count"]!.GetValue<long>()).ToArray() ?? [];

        public ValueTask DisposeAsync() => new(DaemonProcess.ShutdownAsync(Qmp, Daemon));
    }

    private static async Task<Setup> StartAsync(string daemon, params string[] extra)
    {
        var dir = DaemonProcess.NewDirectory();
        var src = System.IO.Path.Combine(dir, "src.img");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", src, "1M");
        await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", src);
        var d = await DaemonProcess.StartAsync(
        [
            "--blockdev", $"driver=file,node-name=srcf,filename={src}",
            "--blockdev", "driver=raw,node-name=src,file=srcf",
            "--nbd-server", $"addr.type=unix,addr.path={System.IO.Path.Combine(dir, "nbd.sock")}",
            .. extra,
        ], dir, executable: daemon == Qsd ? Qsd : null);
        return new Setup { Dir = dir, Daemon = d, Qmp = await d.ConnectAsync() };
    }

    /// <summary>A raw target file of 1 MiB (zeros) whose writes fail once, as QEMU's test's blkdebug target.</summary>
    private static JsonObject FailingOnceTarget(Setup s) => new()
    {
        ["driver"] = "raw",
        ["file"] = new JsonObject
        {
            ["driver"] = "blkdebug",
            ["image"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("target.img") },
            ["inject-error"] = new JsonArray(new JsonObject
            {
                ["event"] = "write_aio", ["errno"] = 5, ["immediately"] = false, ["once"] = true,
            }),
        },
    };

    private static async Task<string> ReadFileAsync(string path, string format, params string[] commands)
    {
        var args = new List<string> { "-f", format, path };
        foreach (var c in commands)
        {
            args.AddRange(["-c", c]);
        }
        return await Tool.RunAsync("qemu-io", [.. args]);
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData(Qsd)]
    public async Task Guest_writes_through_the_filter_copy_the_old_data_to_the_target_once(string daemon)
    {
        await using var s = await StartAsync(daemon);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", s.Path("target.qcow2"), "1M");
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "tgt",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("target.qcow2") },
        });
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "copy-before-write", ["node-name"] = "c0", ["file"] = "src", ["target"] = "tgt" });
        // The filter's own bitmaps (what a snapshot may read, what copy-before-write saved), and the copy bitmap on its file child.
        (await s.NamelessCountsAsync("c0")).Should().Equal(MiB, 0);
        (await s.NamelessCountsAsync("src")).Should().Equal(MiB);
        var filter = await s.NodeAsync("c0");
        filter["drv"]!.GetValue<string>().Should().Be("copy-before-write");
        filter["backing_file_depth"]!.GetValue<int>().Should().Be(1);
        (await s.ErrorAsync("blockdev-del", new JsonObject { ["node-name"] = "tgt" })).Should().Be("Block device tgt is in use");

        await s.ExportAsync("c0");
        (await s.IoAsync("c0", "write -P 0x22 64k 64k")).Should().Be((0, "wrote 65536/65536 bytes at offset 65536"));
        // The same cluster again: already saved, not copied a second time.
        (await s.IoAsync("c0", "write -P 0x23 64k 4k")).Code.Should().Be(0);
        (await s.IoAsync("c0", "read -P 0x23 64k 4k")).Code.Should().Be(0);
        (await s.NamelessCountsAsync("c0")).Should().Equal(MiB, 65536);
        (await s.NamelessCountsAsync("src")).Should().Equal(MiB - 65536);

        await s.UnexportAndDeleteAsync("c0");
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "tgt" });
        (await s.NamelessCountsAsync("src")).Should().BeEmpty();
        var map = await Tool.RunAsync("qemu-img", "map", "--output=json", "-f", "qcow2", s.Path("target.qcow2"));
        var data = JsonNode.Parse(map)!.AsArray().Where(e => e!["data"]!.GetValue<bool>()).Select(e => (e!["start"]!.GetValue<long>(), e["length"]!.GetValue<long>()));
        data.Should().Equal([(65536L, 65536L)], "only the overwritten cluster is copied");
        await ReadFileAsync(s.Path("target.qcow2"), "qcow2", "read -P 0x11 64k 64k");
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData(Qsd)]
    public async Task Options_are_checked_as_qsd_does(string daemon)
    {
        await using var s = await StartAsync(daemon);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", s.Path("t.img"), "1M");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", s.Path("t2m.img"), "2M");
        await s.OkAsync("blockdev-add", new JsonObject { ["driver"] = "raw", ["node-name"] = "tgt", ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("t.img") } });
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "raw", ["node-name"] = "ro", ["read-only"] = true,
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("t2m.img") },
        });
        await s.OkAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = "src", ["name"] = "b0", ["granularity"] = 4096 });
        JsonObject Cbw(params (string Key, JsonNode? Value)[] extra)
        {
            var o = new JsonObject { ["driver"] = "copy-before-write", ["node-name"] = "c0", ["file"] = "src", ["target"] = "tgt" };
            foreach (var (k, v) in extra)
            {
                if (v is null)
                {
                    o.Remove(k);
                }
                else
                {
                    o[k] = v;
                }
            }
            return o;
        }
        var cases = new (JsonObject Args, string Error)[]
        {
            (Cbw(("target", null)), "Parameter 'target' is missing"),
            (Cbw(("file", null)), "Parameter 'file' is missing"),
            (Cbw(("node-name", null)), "'node-name' must be specified for the root node"),
            (Cbw(("target", "nosuch")), "Cannot find device='nosuch' nor node-name='nosuch'"),
            (Cbw(("file", "nosuch")), "Cannot find device='nosuch' nor node-name='nosuch'"),
            (Cbw(("target", "ro")), "Block node is read-only"),
            (Cbw(("bitmap", new JsonObject { ["node"] = "src", ["name"] = "nope" })), "Dirty bitmap 'nope' not found"),
            (Cbw(("bitmap", new JsonObject { ["node"] = "zz", ["name"] = "b0" })), "Node 'zz' not found"),
            (Cbw(("bitmap", new JsonObject { ["node"] = "src" })), "Parameter 'bitmap.name' is missing"),
            (Cbw(("cbw-timeout", -1)), "Parameter 'cbw-timeout' expects uint32_t"),
            (Cbw(("cbw-timeout", 4294967296L)), "Parameter 'cbw-timeout' expects uint32_t"),
            (Cbw(("on-cbw-error", "x")), "Parameter 'on-cbw-error' does not accept value 'x'"),
        };
        // min-cluster-size is QEMU 9.2's; QSD 7.2 does not know it, backupd checks it as QEMU 9.2 does.
        cases = daemon == Qsd
            ? [.. cases, (Cbw(("min-cluster-size", 65536)), "Parameter 'min-cluster-size' is unexpected")]
            : [.. cases, (Cbw(("min-cluster-size", 100_000)), "min-cluster-size needs to be a power of 2"),
                (Cbw(("min-cluster-size", 1UL << 63)), "min-cluster-size too large: 9223372036854775808 > 9223372036854775807")];
        foreach (var (args, error) in cases)
        {
            (await s.ErrorAsync("blockdev-add", args)).Should().Be(error, args.ToJsonString());
        }
        (await s.NodeAsync("src"))["dirty-bitmaps"]!.AsArray().Should().ContainSingle("a failed open leaves no copy bitmap");

        // Accepted as in QSD: the source as its own target, a target of another size, the largest timeout.
        foreach (var args in new[]
        {
            Cbw(("target", "src")), Cbw(("cbw-timeout", 4294967295L)),
        })
        {
            await s.OkAsync("blockdev-add", args);
            await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "c0" });
        }
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "copy-before-write", ["node-name"] = "c2m", ["file"] = "src",
            ["target"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("t2m.img") },
        });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "c2m" });

        // With a bitmap, only its clusters are to copy (in 64 KiB clusters), and the bitmap stays usable.
        await s.ExportAsync("src");
        (await s.IoAsync("src", "write -P 0x11 4k 4k")).Code.Should().Be(0);
        await s.OkAsync("blockdev-add", Cbw(("bitmap", new JsonObject { ["node"] = "src", ["name"] = "b0" })));
        (await s.NamelessCountsAsync("c0")).Should().Equal(65536, 0);
        (await s.NamelessCountsAsync("src")).Should().Equal(65536);
        await s.OkAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = "src", ["name"] = "b0" });
        await s.OkAsync("blockdev-del", new JsonObject { ["node-name"] = "c0" });
    }

    [Fact]
    public async Task Min_cluster_size_makes_each_guest_copy_a_larger_unit()
    {
        await using var s = await StartAsync("backupd");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", s.Path("target.qcow2"), "1M");
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "copy-before-write", ["node-name"] = "c0", ["file"] = "src", ["min-cluster-size"] = 262144,
            ["target"] = new JsonObject
            {
                ["driver"] = "qcow2", ["node-name"] = "tgt",
                ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("target.qcow2") },
            },
        });
        await s.ExportAsync("c0");
        (await s.IoAsync("c0", "write -P 0x44 300k 4k")).Code.Should().Be(0);
        (await s.NamelessCountsAsync("src")).Should().Equal([MiB - 262144], "one 256 KiB unit was copied for a 4 KiB write");
        await s.UnexportAndDeleteAsync("c0");
        var map = await Tool.RunAsync("qemu-img", "map", "--output=json", "-f", "qcow2", s.Path("target.qcow2"));
        var data = JsonNode.Parse(map)!.AsArray().Where(e => e!["data"]!.GetValue<bool>()).Select(e => (e!["start"]!.GetValue<long>(), e["length"]!.GetValue<long>()));
        data.Should().Equal([(262144L, 262144L)], "the unit holding the write, whole");
        await ReadFileAsync(s.Path("target.qcow2"), "qcow2", "read -P 0x11 256k 256k");
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData(Qsd)]
    public async Task A_failed_copy_fails_the_guest_write_with_break_guest_write(string daemon)
    {
        await using var s = await StartAsync(daemon);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", s.Path("target.img"), "1M");
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "copy-before-write", ["node-name"] = "c0", ["file"] = "src", ["on-cbw-error"] = "break-guest-write",
            ["target"] = FailingOnceTarget(s),
        });
        await s.ExportAsync("c0");
        (await s.IoAsync("c0", "write -P 0x22 0 64k")).Should().Be((1, "write failed: Input/output error"));
        (await s.IoAsync("c0", "write -P 0x33 128k 64k")).Code.Should().Be(0);
        (await s.IoAsync("c0", "read -P 0x11 0 64k")).Code.Should().Be(0, "the failed write changed nothing");
        (await s.IoAsync("c0", "read -P 0x33 128k 64k")).Code.Should().Be(0);
        // The failed cluster is still to copy; the second one was saved.
        (await s.NamelessCountsAsync("src")).Should().Equal(MiB - 65536);
        (await s.NamelessCountsAsync("c0")).Should().Equal(MiB, 65536);
        await s.UnexportAndDeleteAsync("c0");
        // The target went with the filter (it was given inline).
        (await s.ErrorAsync("blockdev-del", new JsonObject { ["node-name"] = "tgt" })).Should().Be("Failed to find node with node-name='tgt'");
        await ReadFileAsync(s.Path("target.img"), "raw", "read -P 0 0 128k", "read -P 0x11 128k 64k", "read -P 0 192k 832k");
    }

    [Theory]
    [InlineData("backupd")]
    [InlineData(Qsd)]
    public async Task A_failed_copy_breaks_the_snapshot_and_the_guest_goes_on_with_break_snapshot(string daemon)
    {
        await using var s = await StartAsync(daemon);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", s.Path("target.img"), "1M");
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "copy-before-write", ["node-name"] = "c0", ["file"] = "src", ["on-cbw-error"] = "break-snapshot",
            ["target"] = FailingOnceTarget(s),
        });
        await s.ExportAsync("c0");
        (await s.IoAsync("c0", "write -P 0x22 0 64k")).Should().Be((0, "wrote 65536/65536 bytes at offset 0"));
        // The snapshot is broken: nothing is copied any more.
        (await s.IoAsync("c0", "write -P 0x33 128k 64k")).Code.Should().Be(0);
        (await s.IoAsync("c0", "read -P 0x22 0 64k")).Code.Should().Be(0);
        (await s.NamelessCountsAsync("src")).Should().Equal(MiB);
        (await s.NamelessCountsAsync("c0")).Should().Equal(MiB, 0);
        await s.UnexportAndDeleteAsync("c0");
        await ReadFileAsync(s.Path("target.img"), "raw", "read -P 0 0 1M");
    }

    /// <summary>
    /// QEMU's 283 starts a backup of a source that another parent may write through (refused there by the
    /// permission model, which backupd does not have yet); with a copy-before-write filter already on the
    /// source, QSD accepts the backup, and both the filter's target and the backup hold the source as it was.
    /// </summary>
    [Theory]
    [InlineData("backupd")]
    [InlineData(Qsd)]
    public async Task A_backup_of_a_source_under_a_user_filter_runs_and_both_targets_keep_their_instant(string daemon)
    {
        await using var s = await StartAsync(daemon);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", s.Path("cbw.img"), "1M");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", s.Path("backup.img"), "1M");
        var reference = s.Path("reference.img");
        File.Copy(s.Path("src.img"), reference);
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "copy-before-write", ["node-name"] = "c0", ["file"] = "src",
            ["target"] = new JsonObject { ["driver"] = "raw", ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("cbw.img") } },
        });
        await s.OkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "raw", ["node-name"] = "b",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = s.Path("backup.img") },
        });
        (await s.ErrorAsync("blockdev-backup", new JsonObject { ["device"] = "src", ["target"] = "b", ["sync"] = "full" }))
            .Should().Be("Invalid job ID ''");
        await s.OkAsync("blockdev-backup", new JsonObject
        {
            ["device"] = "src", ["target"] = "b", ["sync"] = "full", ["job-id"] = "j", ["speed"] = 1, ["filter-node-name"] = "f",
            ["x-perf"] = new JsonObject { ["max-chunk"] = 65536 },
        });
        await s.ExportAsync("c0");
        (await s.IoAsync("c0", "write -P 0x44 512k 64k")).Code.Should().Be(0);
        await s.OkAsync("block-job-set-speed", new JsonObject { ["device"] = "j", ["speed"] = 0 });
        while (true)
        {
            var e = await s.Qmp.NextEventAsync(TimeSpan.FromSeconds(60));
            if (e["event"]!.GetValue<string>() == "BLOCK_JOB_COMPLETED")
            {
                e["data"]!["len"]!.GetValue<long>().Should().Be(MiB);
                e["data"]!.AsObject().Should().NotContainKey("error");
                break;
            }
        }
        await s.UnexportAndDeleteAsync("c0");
        for (var i = 0; (await s.Qmp.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = "b" })).ContainsKey("error"); i++)
        {
            i.Should().BeLessThan(500);
            await Task.Delay(10);
        }
        (await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", s.Path("backup.img"), reference)).Should().Contain("Images are identical.");
        await ReadFileAsync(s.Path("cbw.img"), "raw", "read -P 0 0 512k", "read -P 0x11 512k 64k", "read -P 0 576k 448k");
    }

    /// <summary>
    /// cbw-timeout as QEMU's test checks it, with a target that takes 3 s per request (null-co latency-ns;
    /// QEMU's test throttles the target instead). break-guest-write: the guest write gives up after the
    /// timeout (ETIMEDOUT, which QEMU's NBD server sends as EINVAL). break-snapshot: it goes on after the
    /// timeout, and later writes no longer wait.
    /// </summary>
    private static async Task CbwTimeoutAsync(string daemon)
    {
        foreach (var mode in new[] { "break-guest-write", "break-snapshot" })
        {
            await using var s = await StartAsync(daemon);
            await s.OkAsync("blockdev-add", new JsonObject
            {
                ["driver"] = "copy-before-write", ["node-name"] = "c0", ["file"] = "src", ["on-cbw-error"] = mode, ["cbw-timeout"] = 1,
                ["target"] = new JsonObject { ["driver"] = "null-co", ["size"] = MiB, ["latency-ns"] = 3_000_000_000L },
            });
            await s.ExportAsync("c0");
            var watch = System.Diagnostics.Stopwatch.StartNew();
            var first = await s.IoAsync("c0", "write -P 0x22 0 64k");
            var firstTime = watch.Elapsed;
            firstTime.Should().BeGreaterThan(TimeSpan.FromMilliseconds(900)).And.BeLessThan(TimeSpan.FromMilliseconds(2900));
            if (mode == "break-guest-write")
            {
                first.Should().Be((1, "write failed: Invalid argument"));
                (await s.IoAsync("c0", "read -P 0x11 0 64k")).Code.Should().Be(0);
            }
            else
            {
                first.Should().Be((0, "wrote 65536/65536 bytes at offset 0"));
                watch.Restart();
                (await s.IoAsync("c0", "write -P 0x33 128k 64k")).Code.Should().Be(0);
                watch.Elapsed.Should().BeLessThan(TimeSpan.FromMilliseconds(900), "the snapshot is broken, nothing is copied");
                (await s.NamelessCountsAsync("c0")).Should().Equal(MiB, 0);
            }
            await s.UnexportAndDeleteAsync("c0");
        }
    }

    [Fact]
    public Task Cbw_timeout_on_qsd() => CbwTimeoutAsync(Qsd);

    [FactRequiringDriver("null-co")]
    public Task Cbw_timeout_on_backupd() => CbwTimeoutAsync("backupd");
}

/// <summary>A fact skipped, loudly, while backupd's schema lacks a block driver the test needs as a fixture.</summary>
public sealed class FactRequiringDriverAttribute : FactAttribute
{
    public FactRequiringDriverAttribute(string driver)
    {
        Driver = driver;
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            var schema = Path.Combine(d.FullName, "schemas", "block-core.json");
            if (File.Exists(schema))
            {
                if (!File.ReadAllText(schema).Contains($"\"{driver}\"", StringComparison.Ordinal))
                {
                    Skip = $"backupd has no '{driver}' driver yet (one of QEMU's test fixture drivers)";
                }
                return;
            }
        }
    }

    public string Driver { get; }
}
