using System.Diagnostics;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// The nbd client driver against real servers (qemu-nbd, nbdkit with its error filter, qemu-storage-daemon):
/// backups to and from remote nodes, a remote target that fails part-way (run against backupd and QSD with the
/// same expectations, recorded from QSD 7.2 first), and a server killed and restarted during a backup with
/// reconnect-delay.
/// </summary>
public sealed class NbdClientTests : IAsyncLifetime
{
    private const int MiB = 1 << 20;
    private readonly List<Process> _servers = [];
    private string _dir = "";
    private DaemonProcess? _daemon;
    private QmpClient? _qmp;

    private QmpClient Qmp => _qmp!;

    public Task InitializeAsync()
    {
        _dir = DaemonProcess.NewDirectory();
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await DaemonProcess.ShutdownAsync(_qmp, _daemon);
        foreach (var p in _servers)
        {
            Stop(p);
        }
    }

    private string PathOf(string name) => Path.Combine(_dir, name);

    private string DriveUri => $"nbd+unix:///drive0?socket={PathOf("nbd.sock")}";

    private static void Stop(Process p)
    {
        if (!p.HasExited)
        {
            p.Kill();
            p.WaitForExit(5000);
        }
        p.Dispose();
    }

    /// <summary>Starts a server process and waits for its Unix socket.</summary>
    private async Task<Process> StartServerAsync(string socket, string file, params string[] args)
    {
        File.Delete(socket);
        var psi = new ProcessStartInfo(file) { UseShellExecute = false, RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        var p = Process.Start(psi)!;
        // What the server said, for the failure message when it does not come up.
        var said = new System.Collections.Concurrent.ConcurrentQueue<string>();
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) { said.Enqueue(e.Data); } };
        p.BeginErrorReadLine();
        p.BeginOutputReadLine();
        _servers.Add(p);
        var deadline = DateTime.UtcNow.AddSeconds(20);
        // The socket file appears at bind(), before listen(): wait until a connection is accepted.
        while (true)
        {
            p.HasExited.Should().BeFalse($"{file} exited early (status {(p.HasExited ? p.ExitCode : 0)}): {string.Join(" / ", said)}");
            DateTime.UtcNow.Should().BeBefore(deadline, $"{file} did not listen on {socket}");
            if (File.Exists(socket))
            {
                using var probe = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix,
                    System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified);
                try
                {
                    await probe.ConnectAsync(new System.Net.Sockets.UnixDomainSocketEndPoint(socket));
                    return p;
                }
                catch (System.Net.Sockets.SocketException)
                {
                }
            }
            await Task.Delay(20);
        }
    }

    private Task<Process> StartQemuNbdAsync(string socket, string image, string format = "raw") =>
        StartServerAsync(socket, "qemu-nbd", "-t", "-e", "16", "-k", socket, "-f", format, "-x", "exp", "--cache=writeback", image);

    /// <summary>nbdkit's memory plugin behind the error filter: writes fail while <c>error</c> exists in the directory.</summary>
    /// <remarks>
    /// nbdkit asks for SIGTERM when its parent dies (PR_SET_PDEATHSIG), and Linux sends it when the parent
    /// thread ends: the pool thread that started it may end any time. A shell that waits for it is a parent
    /// that lives as long as it does (and killing the shell stops nbdkit too).
    /// </remarks>
    private Task<Process> StartFailingNbdkitAsync(string socket) =>
        StartServerAsync(socket, "sh", "-c", "nbdkit \"$@\" & wait $!", "nbdkit", "-f", "-U", socket, "--filter=error", "memory", "64M",
            "error-pwrite-rate=100%", $"error-pwrite-file={PathOf("error")}");

    private async Task StartDaemonAsync(string daemon = "backupd")
    {
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", PathOf("disk.qcow2"), "64M");
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", "-c", "write -P 0x22 20M 3M", PathOf("disk.qcow2"));
        var drive = new JsonObject
        {
            ["driver"] = "qcow2",
            ["node-name"] = "drive0",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = PathOf("disk.qcow2") },
        };
        _daemon = await DaemonProcess.StartAsync(
        [
            "--blockdev", drive.ToJsonString(),
            "--nbd-server", $"addr.type=unix,addr.path={PathOf("nbd.sock")}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on",
        ], _dir,
            executable: daemon == "qsd" ? "qemu-storage-daemon" : null);
        _qmp = await _daemon.ConnectAsync();
    }

    private async Task<JsonObject> ExecuteOkAsync(string command, object? arguments = null)
    {
        var reply = await Qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("return", reply.ToJsonString());
        return reply;
    }

    private static JsonObject NbdNode(string name, string socket, string? export = "exp", int reconnectDelay = 0)
    {
        var o = new JsonObject
        {
            ["driver"] = "nbd",
            ["node-name"] = name,
            ["server"] = new JsonObject { ["type"] = "unix", ["path"] = socket },
        };
        if (export is not null)
        {
            o["export"] = export;
        }
        if (reconnectDelay > 0)
        {
            o["reconnect-delay"] = reconnectDelay;
        }
        return o;
    }

    /// <summary>The events of job <paramref name="id"/> until it is gone (or concluded, without auto-dismiss).</summary>
    private async Task<List<string>> JobEventsAsync(string id, bool autoDismiss = true)
    {
        var list = new List<string>();
        while (true)
        {
            var e = await Qmp.NextEventAsync(TimeSpan.FromSeconds(120));
            var data = e["data"]!.AsObject();
            if ((string?)(data["id"] ?? data["device"]) != id)
            {
                continue;
            }
            var name = e["event"]!.GetValue<string>();
            var text = name == "JOB_STATUS_CHANGE" ? data["status"]!.GetValue<string>()
                : name == "BLOCK_JOB_ERROR" ? $"{name} {data["operation"]} {data["action"]}"
                : name == "BLOCK_JOB_COMPLETED" && data["error"] is { } err ? $"{name} {err}"
                : name;
            list.Add(text);
            if (name == "JOB_STATUS_CHANGE" && (text == "null" || (text == "concluded" && !autoDismiss)))
            {
                return list;
            }
        }
    }

    private async Task<long> BitmapCountAsync()
    {
        var nodes = (await Qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        var drive = nodes.First(n => n!["node-name"]!.GetValue<string>() == "drive0")!;
        return drive["dirty-bitmaps"]!.AsArray().First(b => b!["name"]?.GetValue<string>() == "b0")!["count"]!.GetValue<long>();
    }

    [Fact]
    public async Task Full_backup_to_qemu_nbd_matches_the_disk()
    {
        await StartDaemonAsync();
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("t.raw"), "64M");
        await StartQemuNbdAsync(PathOf("t.sock"), PathOf("t.raw"));
        await ExecuteOkAsync("blockdev-add", NbdNode("t", PathOf("t.sock")));
        var info = (await ExecuteOkAsync("query-named-block-nodes", new { flat = true }))["return"]!.AsArray()
            .First(n => (string?)n!["node-name"] == "t")!;
        info["drv"]!.GetValue<string>().Should().Be("nbd");
        info["file"]!.GetValue<string>().Should().Be($"nbd+unix:///exp?socket={PathOf("t.sock")}");
        info["image"]!["virtual-size"]!.GetValue<long>().Should().Be(64 * MiB);

        await ExecuteOkAsync("blockdev-backup", new { device = "drive0", target = "t", sync = "full", job_id = "j" }.ToJobArgs());
        (await JobEventsAsync("j")).Should().ContainInOrder("created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null");
        await ExecuteOkAsync("blockdev-del", new { node_name = "t" }.ToJobArgs());
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", PathOf("disk.qcow2"), PathOf("t.raw"));
    }

    [Fact]
    public async Task Drive_backup_takes_nbd_file_names_and_formats_qcow2_on_the_export()
    {
        await StartDaemonAsync();
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("t.raw"), "64M");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("q.raw"), "80M");
        await StartQemuNbdAsync(PathOf("t.sock"), PathOf("t.raw"));
        await StartQemuNbdAsync(PathOf("q.sock"), PathOf("q.raw"));
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["device"] = "drive0", ["job-id"] = "j1", ["sync"] = "full", ["mode"] = "existing", ["format"] = "raw",
            ["target"] = $"nbd:unix:{PathOf("t.sock")}:exportname=exp",
        });
        (await JobEventsAsync("j1")).Should().Contain("BLOCK_JOB_COMPLETED").And.EndWith("null");
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["device"] = "drive0", ["job-id"] = "j2", ["sync"] = "full", ["format"] = "qcow2",
            ["target"] = $"nbd+unix:///exp?socket={PathOf("q.sock")}",
        });
        (await JobEventsAsync("j2")).Should().Contain("BLOCK_JOB_COMPLETED").And.EndWith("null");
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", PathOf("disk.qcow2"), PathOf("t.raw"));
        // The qcow2 image written onto the export reads back through qemu-nbd as the disk.
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", PathOf("disk.qcow2"), PathOf("q.raw"));
    }

    [Fact]
    public async Task Drive_backup_takes_json_file_names_of_existing_images()
    {
        // QSD 7.2, checked live: json: names an existing image only; the errors below are its words.
        await StartDaemonAsync();
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("t.raw"), "64M");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("q.raw"), "80M");
        await StartQemuNbdAsync(PathOf("t.sock"), PathOf("t.raw"));
        await StartQemuNbdAsync(PathOf("q.sock"), PathOf("q.raw"));
        string Nbd(string socket) => new JsonObject
        {
            ["driver"] = "nbd", ["server"] = new JsonObject { ["type"] = "unix", ["path"] = PathOf(socket) }, ["export"] = "exp",
        }.ToJsonString();

        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["device"] = "drive0", ["job-id"] = "j1", ["sync"] = "full", ["mode"] = "existing", ["target"] = "json:" + Nbd("t.sock"),
        });
        (await JobEventsAsync("j1")).Should().Contain("BLOCK_JOB_COMPLETED").And.EndWith("null");
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", PathOf("disk.qcow2"), PathOf("t.raw"));

        // A qcow2 image on the export (formatted through an nbd: name first), then named by json: as format over protocol.
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["device"] = "drive0", ["job-id"] = "j2", ["sync"] = "full", ["format"] = "qcow2", ["target"] = $"nbd+unix:///exp?socket={PathOf("q.sock")}",
        });
        (await JobEventsAsync("j2")).Should().Contain("BLOCK_JOB_COMPLETED");
        await Tool.RunAsync("qemu-io", "--image-opts", $"driver=nbd,server.type=unix,server.path={PathOf("nbd.sock")},export=drive0",
            "-c", "write -P 0x7e 5M 1M");
        await ExecuteOkAsync("drive-backup", new JsonObject
        {
            ["device"] = "drive0", ["job-id"] = "j3", ["sync"] = "full", ["mode"] = "existing",
            ["target"] = "json:" + new JsonObject { ["driver"] = "qcow2", ["file"] = JsonNode.Parse(Nbd("q.sock")) }.ToJsonString(),
        });
        (await JobEventsAsync("j3")).Should().Contain("BLOCK_JOB_COMPLETED").And.EndWith("null");
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", PathOf("disk.qcow2"), PathOf("q.raw"));

        async Task<string> ErrorOf(string target, string? mode = "existing")
        {
            var args = new JsonObject { ["device"] = "drive0", ["job-id"] = "e", ["sync"] = "full", ["target"] = target };
            if (mode is not null)
            {
                args["mode"] = mode;
            }
            return (await Qmp.ExecuteAsync("drive-backup", args))["error"]!["desc"]!.GetValue<string>();
        }
        (await ErrorOf("json:{\"driver\":\"nbd\"")).Should().Be("Could not parse the JSON options: JSON parse error, premature EOI");
        (await ErrorOf("json:[1]")).Should().Be("Invalid JSON object given");
        (await ErrorOf("json:" + Nbd("t.sock"), mode: null)).Should().Be("Unknown protocol 'json'");
        (await Qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray().Should().HaveCount(2, "no target node is left behind");
    }

    [Fact]
    public async Task Opening_errors_are_qemus()
    {
        await StartDaemonAsync();
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("t.raw"), "64M");
        await StartQemuNbdAsync(PathOf("t.sock"), PathOf("t.raw"));
        async Task<string> ErrorOf(JsonObject o) => (await Qmp.ExecuteAsync("blockdev-add", o))["error"]!["desc"]!.GetValue<string>();
        (await ErrorOf(NbdNode("a", PathOf("t.sock"), "nope"))).Should().Be("Requested export not available");
        (await ErrorOf(NbdNode("a", PathOf("none.sock")))).Should().Be($"Failed to connect to '{PathOf("none.sock")}': No such file or directory");
        var bitmap = NbdNode("a", PathOf("t.sock"));
        bitmap["x-dirty-bitmap"] = "qemu:dirty-bitmap:nope";
        (await ErrorOf(bitmap)).Should().Be("Could not open image: Invalid argument");
        var fd = NbdNode("a", PathOf("t.sock"));
        fd["server"] = new JsonObject { ["type"] = "fd", ["str"] = "3" };
        (await ErrorOf(fd)).Should().Be("only QEMU supports file descriptor passing");
        var tcp = NbdNode("a", PathOf("t.sock"));
        tcp["server"] = new JsonObject { ["type"] = "inet", ["host"] = "127.0.0.1", ["port"] = "1" };
        (await ErrorOf(tcp)).Should().Be("Failed to connect to '127.0.0.1:1': Connection refused");
    }

    /// <summary>
    /// QSD 7.2 (checked live): an incremental backup whose remote target (nbdkit's error filter) fails writes
    /// reports BLOCK_JOB_ERROR write/report, aborts, completes with "Input/output error", stays concluded in
    /// query-jobs until job-dismiss, and leaves every bit in the bitmap; the next incremental to a fresh
    /// target copies all of it.
    /// </summary>
    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task Incremental_to_a_failing_remote_target_keeps_the_bitmap_and_stays_queryable(string daemon)
    {
        await StartDaemonAsync(daemon);
        await ExecuteOkAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = "drive0", ["name"] = "b0" });
        // The guest's writes, through the daemon's own export of the drive.
        await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "write -P 0x33 4M 2M", "-c", "write -P 0x44 30M 1M", DriveUri);
        var dirty = await BitmapCountAsync();
        dirty.Should().Be(3 * MiB);

        await File.WriteAllTextAsync(PathOf("error"), "");
        await StartFailingNbdkitAsync(PathOf("kit.sock"));
        await ExecuteOkAsync("blockdev-add", NbdNode("t", PathOf("kit.sock"), export: null));
        await ExecuteOkAsync("blockdev-backup", new JsonObject
        {
            ["device"] = "drive0", ["target"] = "t", ["job-id"] = "j", ["sync"] = "incremental", ["bitmap"] = "b0",
            ["auto-dismiss"] = false,
        });
        var events = await JobEventsAsync("j", autoDismiss: false);
        events.Should().ContainInOrder("created", "running", "BLOCK_JOB_ERROR write report", "aborting",
            "BLOCK_JOB_COMPLETED Input/output error", "concluded");
        events.Should().EndWith("concluded");
        var jobs = (await ExecuteOkAsync("query-jobs"))["return"]!.AsArray();
        jobs.Should().ContainSingle();
        jobs[0]!["status"]!.GetValue<string>().Should().Be("concluded");
        jobs[0]!["error"]!.GetValue<string>().Should().Be("Input/output error");
        (await BitmapCountAsync()).Should().Be(dirty);
        await ExecuteOkAsync("job-dismiss", new JsonObject { ["id"] = "j" });
        (await ExecuteOkAsync("query-jobs"))["return"]!.AsArray().Should().BeEmpty();

        // The daemon and the node go on: the same server now takes writes, and the incremental is complete.
        File.Delete(PathOf("error"));
        await ExecuteOkAsync("blockdev-backup", new JsonObject
        {
            ["device"] = "drive0", ["target"] = "t", ["job-id"] = "j2", ["sync"] = "incremental", ["bitmap"] = "b0",
        });
        (await JobEventsAsync("j2")).Should().Contain("BLOCK_JOB_COMPLETED").And.EndWith("null");
        (await BitmapCountAsync()).Should().Be(0);
        var read = await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "read -P 0x33 4M 2M", "-c", "read -P 0x44 30M 1M",
            $"nbd+unix:///?socket={PathOf("kit.sock")}");
        read.Should().NotContain("Pattern verification failed");
    }

    /// <summary>A grouped transaction: one drive's remote target fails while the other's backup runs on; QSD's grouped semantics cancel the rest.</summary>
    [Theory]
    [InlineData("backupd")]
    [InlineData("qsd")]
    public async Task Grouped_transaction_with_one_failing_remote_target_cancels_the_other(string daemon)
    {
        await StartDaemonAsync(daemon);
        await File.WriteAllTextAsync(PathOf("error"), "");
        await StartFailingNbdkitAsync(PathOf("kit.sock"));
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("t.raw"), "64M");
        await StartQemuNbdAsync(PathOf("t.sock"), PathOf("t.raw"));
        await ExecuteOkAsync("blockdev-add", NbdNode("bad", PathOf("kit.sock"), export: null));
        await ExecuteOkAsync("blockdev-add", NbdNode("good", PathOf("t.sock")));
        await ExecuteOkAsync("transaction", new JsonObject
        {
            ["actions"] = new JsonArray(
                new JsonObject { ["type"] = "blockdev-backup", ["data"] = new JsonObject { ["device"] = "drive0", ["target"] = "bad", ["sync"] = "full", ["job-id"] = "jb" } },
                new JsonObject { ["type"] = "blockdev-backup", ["data"] = new JsonObject { ["device"] = "drive0", ["target"] = "good", ["sync"] = "full", ["job-id"] = "jg", ["speed"] = 1 } }),
            ["properties"] = new JsonObject { ["completion-mode"] = "grouped" },
        });
        var completed = new Dictionary<string, string>();
        while (completed.Count < 2)
        {
            var e = await Qmp.NextEventAsync(TimeSpan.FromSeconds(120));
            if (e["event"]!.GetValue<string>() is "BLOCK_JOB_COMPLETED" or "BLOCK_JOB_CANCELLED")
            {
                var d = e["data"]!;
                completed[d["device"]!.GetValue<string>()] = e["event"]!.GetValue<string>() + " " + (d["error"]?.GetValue<string>() ?? "");
            }
        }
        completed["jb"].Should().Be("BLOCK_JOB_COMPLETED Input/output error");
        completed["jg"].Should().Be("BLOCK_JOB_CANCELLED ");
    }

    /// <summary>The server is killed during a backup and started again within reconnect-delay: the job completes.</summary>
    [Fact]
    public async Task Backup_survives_a_server_restart_within_reconnect_delay()
    {
        await StartDaemonAsync();
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("t.raw"), "64M");
        var server = await StartQemuNbdAsync(PathOf("t.sock"), PathOf("t.raw"));
        await ExecuteOkAsync("blockdev-add", NbdNode("t", PathOf("t.sock"), reconnectDelay: 30));
        // 4 MiB/s: the 11 MiB of data take about three seconds, long enough to restart the server in between.
        await ExecuteOkAsync("blockdev-backup", new JsonObject
        {
            ["device"] = "drive0", ["target"] = "t", ["job-id"] = "j", ["sync"] = "full", ["speed"] = 4 * MiB,
        });
        await Task.Delay(700);
        _servers.Remove(server);
        Stop(server);
        await Task.Delay(1500);
        await StartQemuNbdAsync(PathOf("t.sock"), PathOf("t.raw"));
        var events = await JobEventsAsync("j");
        events.Should().ContainInOrder("created", "running", "waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded", "null");
        _daemon!.Stderr.Should().Contain("reconnected");
        await ExecuteOkAsync("blockdev-del", new JsonObject { ["node-name"] = "t" });
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", PathOf("disk.qcow2"), PathOf("t.raw"));
    }

    /// <summary>Without reconnect-delay, requests fail at once when the server is gone: the job fails with EIO.</summary>
    [Fact]
    public async Task Without_reconnect_delay_a_lost_server_fails_the_backup_with_eio()
    {
        await StartDaemonAsync();
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("t.raw"), "64M");
        var server = await StartQemuNbdAsync(PathOf("t.sock"), PathOf("t.raw"));
        await ExecuteOkAsync("blockdev-add", NbdNode("t", PathOf("t.sock")));
        _servers.Remove(server);
        Stop(server);
        await ExecuteOkAsync("blockdev-backup", new JsonObject { ["device"] = "drive0", ["target"] = "t", ["job-id"] = "j", ["sync"] = "full" });
        (await JobEventsAsync("j")).Should().Contain("BLOCK_JOB_COMPLETED Input/output error");
    }

    /// <summary>
    /// qemu-storage-daemon exports a disk; backupd opens it as an nbd node (read through base:allocation,
    /// x-dirty-bitmap reads QSD's bitmap as QEMU maps it) and exports it again: qemu-img reads the same data
    /// through backupd's export.
    /// </summary>
    [Fact]
    public async Task A_qsd_export_is_readable_through_backupd_and_exportable_again()
    {
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", PathOf("remote.qcow2"), "64M");
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 1M 2M", PathOf("remote.qcow2"));
        var qsdDir = DaemonProcess.NewDirectory();
        var remote = new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "disk",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = PathOf("remote.qcow2") },
        };
        await using var qsd = await DaemonProcess.StartAsync(
        [
            "--blockdev", remote.ToJsonString(),
            "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(qsdDir, "nbd.sock")}",
        ], qsdDir, executable: "qemu-storage-daemon");
        await using var qsdQmp = await qsd.ConnectAsync();
        (await qsdQmp.ExecuteAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = "disk", ["name"] = "b0" })).Should().ContainKey("return");
        // QSD 7.2 exports an enabled bitmap only from a writable export.
        (await qsdQmp.ExecuteAsync("block-export-add", new JsonObject
        {
            ["type"] = "nbd", ["id"] = "e", ["node-name"] = "disk", ["name"] = "disk", ["bitmaps"] = new JsonArray("b0"), ["writable"] = true,
        })).Should().ContainKey("return");
        // Dirty 1 MiB at 8 MiB: a write of the guest.
        await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "write -P 0x55 8M 1M", $"nbd+unix:///disk?socket={Path.Combine(qsdDir, "nbd.sock")}");

        await StartDaemonAsync();
        var node = NbdNode("remote", Path.Combine(qsdDir, "nbd.sock"), "disk");
        node["read-only"] = true;
        await ExecuteOkAsync("blockdev-add", node);
        await ExecuteOkAsync("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = "re", ["node-name"] = "remote", ["name"] = "re" });
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", $"nbd+unix:///re?socket={PathOf("nbd.sock")}", PathOf("remote.qcow2"));

        // x-dirty-bitmap: the dirty MiB reads as a hole, the rest as data, as qemu-img map shows through QEMU's driver.
        var bitmap = NbdNode("dirty", Path.Combine(qsdDir, "nbd.sock"), "disk");
        bitmap["read-only"] = true;
        bitmap["x-dirty-bitmap"] = "qemu:dirty-bitmap:b0";
        await ExecuteOkAsync("blockdev-add", bitmap);
        await ExecuteOkAsync("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = "d", ["node-name"] = "dirty", ["name"] = "d" });
        var map = JsonNode.Parse(await Tool.RunAsync("qemu-img", "map", "--output=json", "-f", "raw",
            $"nbd+unix:///d?socket={PathOf("nbd.sock")}"))!.AsArray();
        map.Where(e => !e!["data"]!.GetValue<bool>()).Select(e => (e!["start"]!.GetValue<long>(), e["length"]!.GetValue<long>()))
            .Should().Equal((8L * MiB, 1L * MiB));
        await DaemonProcess.ShutdownAsync(_qmp, _daemon);
        (_qmp, _daemon) = (null, null);
    }

    /// <summary>A backupd reads another daemon's export (as a backup source) and a qcow2 image sits on an nbd node.</summary>
    [Fact]
    public async Task Qcow2_on_an_nbd_node_and_backup_from_a_remote_source()
    {
        await StartDaemonAsync();
        // Serve a qcow2 file's bytes (raw): the qcow2 driver runs here, over the nbd node.
        File.Copy(PathOf("disk.qcow2"), PathOf("remote.qcow2"));
        await StartServerAsync(PathOf("img.sock"), "qemu-nbd", "-t", "-e", "16", "-r", "-k", PathOf("img.sock"), "-f", "raw", "-x", "exp",
            PathOf("remote.qcow2"));
        await ExecuteOkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "remote", ["read-only"] = true,
            ["file"] = NbdNode("remote-file", PathOf("img.sock")).Also(o => o["read-only"] = true),
        });
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", PathOf("t.raw"), "64M");
        await ExecuteOkAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "raw", ["node-name"] = "t", ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = PathOf("t.raw") },
        });
        await ExecuteOkAsync("blockdev-backup", new JsonObject { ["device"] = "remote", ["target"] = "t", ["job-id"] = "j", ["sync"] = "full" });
        (await JobEventsAsync("j")).Should().Contain("BLOCK_JOB_COMPLETED").And.EndWith("null");
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", PathOf("disk.qcow2"), PathOf("t.raw"));
    }
}

internal static class JsonArgs
{
    /// <summary>An anonymous object's properties as QMP arguments (underscores become dashes).</summary>
    public static JsonObject ToJobArgs(this object o)
    {
        var result = new JsonObject();
        foreach (var p in o.GetType().GetProperties())
        {
            result[p.Name.Replace('_', '-')] = JsonValue.Create(p.GetValue(o));
        }
        return result;
    }

    public static JsonObject Also(this JsonObject o, Action<JsonObject> change)
    {
        change(o);
        return o;
    }
}
