using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// docs/scale-out.md end to end on one machine: a host backupd next to its disk pushes a full and two
/// incremental backups over NBD into a repository backupd that serves a qcow2 chain (full ← inc1 ← inc2),
/// while a guest writes to the disk. Writes that land during a push go to the next incremental (the
/// bitmap's successor), so once the guest stops and the last incremental is pushed, the chain read through
/// qemu-img must equal the disk.
/// </summary>
public sealed class ScaleOutTests : IAsyncLifetime
{
    private const int MiB = 1 << 20;
    private string _hostDir = "";
    private string _repoDir = "";
    private DaemonProcess? _host;
    private DaemonProcess? _repo;
    private QmpClient? _hostQmp;
    private QmpClient? _repoQmp;

    public Task InitializeAsync()
    {
        _hostDir = DaemonProcess.NewDirectory();
        _repoDir = DaemonProcess.NewDirectory();
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await DaemonProcess.ShutdownAsync(_hostQmp, _host);
        await DaemonProcess.ShutdownAsync(_repoQmp, _repo);
    }

    private string Host(string name) => Path.Combine(_hostDir, name);

    private string Repo(string name) => Path.Combine(_repoDir, name);

    private static async Task<JsonObject> OkAsync(QmpClient qmp, string command, JsonObject? arguments = null)
    {
        var reply = await qmp.ExecuteAsync(command, arguments);
        reply.Should().ContainKey("return", reply.ToJsonString());
        return reply;
    }

    /// <summary>The repository makes <paramref name="image"/> (backed by <paramref name="backing"/>), opens it and exports it writable.</summary>
    private async Task PrepareRepositoryImageAsync(string image, string? backing)
    {
        var args = new List<string> { "create", "-q", "-f", "qcow2" };
        if (backing is not null)
        {
            args.AddRange(["-b", backing + ".qcow2", "-F", "qcow2"]);
        }
        args.AddRange([Repo(image + ".qcow2"), "64M"]);
        await Tool.RunAsync("qemu-img", [.. args]);
        var node = new JsonObject
        {
            ["driver"] = "qcow2",
            ["node-name"] = image,
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = Repo(image + ".qcow2") },
        };
        if (backing is not null)
        {
            // The previous image is open already (and locked): the new one uses that node as its backing.
            node["backing"] = backing;
        }
        await OkAsync(_repoQmp!, "blockdev-add", node);
        await OkAsync(_repoQmp!, "block-export-add", new JsonObject
        {
            ["type"] = "nbd", ["id"] = image, ["node-name"] = image, ["name"] = image, ["writable"] = true,
        });
    }

    /// <summary>The host opens the repository's export as an nbd node.</summary>
    private async Task AddRemoteTargetAsync(string image) =>
        await OkAsync(_hostQmp!, "blockdev-add", new JsonObject
        {
            ["driver"] = "nbd",
            ["node-name"] = "repo-" + image,
            ["server"] = new JsonObject { ["type"] = "unix", ["path"] = Repo("nbd.sock") },
            ["export"] = image,
        });

    private async Task WaitForJobAsync(string id)
    {
        while (true)
        {
            var e = await _hostQmp!.NextEventAsync(TimeSpan.FromSeconds(120));
            var data = e["data"]!;
            if ((string?)(data["device"] ?? data["id"]) != id)
            {
                continue;
            }
            if (e["event"]!.GetValue<string>() == "BLOCK_JOB_COMPLETED")
            {
                data["error"].Should().BeNull(e.ToJsonString());
            }
            if (e["event"]!.GetValue<string>() == "JOB_STATUS_CHANGE" && data["status"]!.GetValue<string>() == "null")
            {
                return;
            }
        }
    }

    /// <summary>The guest: qemu-io writing through the host's own export of its disk.</summary>
    private Task GuestWritesAsync(int seed, int count) => Task.Run(async () =>
    {
        var rng = new Random(seed);
        var args = new List<string> { "-f", "raw" };
        for (var i = 0; i < count; i++)
        {
            args.AddRange(["-c", $"write -P 0x{rng.Next(1, 255):x2} {rng.Next(0, 63 * 16) * 64}k 64k"]);
        }
        args.Add($"nbd+unix:///drive0?socket={Host("nbd.sock")}");
        await Tool.RunAsync("qemu-io", [.. args]);
    });

    [Fact]
    public async Task Host_pushes_full_and_two_incrementals_to_a_repository_daemon_while_the_guest_writes()
    {
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Host("disk.qcow2"), "64M");
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 16M", "-c", "write -P 0xa5 40M 8M", Host("disk.qcow2"));
        var drive = new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "drive0",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = Host("disk.qcow2") },
        };
        _host = await DaemonProcess.StartAsync(
        [
            "--blockdev", drive.ToJsonString(),
            "--nbd-server", $"addr.type=unix,addr.path={Host("nbd.sock")}",
            "--export", "type=nbd,id=guest,node-name=drive0,name=drive0,writable=on",
        ], _hostDir);
        _hostQmp = await _host.ConnectAsync();
        _repo = await DaemonProcess.StartAsync(["--nbd-server", $"addr.type=unix,addr.path={Repo("nbd.sock")}"], _repoDir);
        _repoQmp = await _repo.ConnectAsync();

        // Full: the bitmap starts at the same instant as the full backup (one transaction).
        await PrepareRepositoryImageAsync("full", null);
        await AddRemoteTargetAsync("full");
        var guest = GuestWritesAsync(1, 200);
        await OkAsync(_hostQmp, "transaction", new JsonObject
        {
            ["actions"] = new JsonArray(
                new JsonObject { ["type"] = "block-dirty-bitmap-add", ["data"] = new JsonObject { ["node"] = "drive0", ["name"] = "b0" } },
                new JsonObject { ["type"] = "blockdev-backup", ["data"] = new JsonObject { ["device"] = "drive0", ["target"] = "repo-full", ["sync"] = "full", ["job-id"] = "full" } }),
        });
        await WaitForJobAsync("full");
        await guest;

        // Two incrementals, the first one while the guest writes.
        string? previous = "full";
        foreach (var (inc, seed) in new[] { ("inc1", 2), ("inc2", 3) })
        {
            await PrepareRepositoryImageAsync(inc, previous);
            await AddRemoteTargetAsync(inc);
            guest = inc == "inc1" ? GuestWritesAsync(seed, 200) : Task.CompletedTask;
            await OkAsync(_hostQmp, "blockdev-backup", new JsonObject
            {
                ["device"] = "drive0", ["target"] = "repo-" + inc, ["sync"] = "incremental", ["bitmap"] = "b0", ["job-id"] = inc,
            });
            await WaitForJobAsync(inc);
            await guest;
            previous = inc;
        }
        // inc2 ran with the guest stopped: the chain now holds everything the disk does. Both are compared as the
        // daemons serve them (the disk through the host's export, the chain through the repository's export of inc2).
        await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw",
            $"nbd+unix:///drive0?socket={Host("nbd.sock")}", $"nbd+unix:///inc2?socket={Repo("nbd.sock")}");
        // The repository stops (its images closed and flushed) before qemu-img reads inc2 itself.
        await _repoQmp!.ExecuteAsync("quit");
        await _repo!.WaitForExitAsync(TimeSpan.FromSeconds(30));
        // An incremental holds only what changed: inc2's own data is at most the guest's writes during inc1.
        var map = JsonNode.Parse(await Tool.RunAsync("qemu-img", "map", "--output=json", "-f", "qcow2", Repo("inc2.qcow2")))!.AsArray();
        var own = map.Where(e => e!["depth"]!.GetValue<int>() == 0 && e["data"]!.GetValue<bool>()).Sum(e => e!["length"]!.GetValue<long>());
        own.Should().BeGreaterThan(0).And.BeLessThanOrEqualTo(200 * 64 * 1024);
    }
}
