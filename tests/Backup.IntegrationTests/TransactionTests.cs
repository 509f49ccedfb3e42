using System.Diagnostics;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Transactions across three drives, end to end: one point in time for all backups of a transaction,
/// all-or-nothing preparation, grouped completion with an injected target failure, and a new chain
/// (clear + full) whose bitmap starts empty exactly at the backup's instant.
/// </summary>
public sealed class TransactionTests : IAsyncLifetime
{
    private const int MiB = 1 << 20;
    private static readonly string[] Drives = ["d0", "d1", "d2"];
    private string _dir = "";
    private DaemonProcess? _daemon;
    private QmpClient? _qmp;
    private int _files;

    private QmpClient Qmp => _qmp!;

    public async Task InitializeAsync()
    {
        _dir = DaemonProcess.NewDirectory();
        var args = new List<string>();
        foreach (var d in Drives)
        {
            await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(_dir, d + ".qcow2"), "32M");
            args.AddRange(["--blockdev", $"driver=qcow2,node-name={d},file.driver=file,file.filename={d}.qcow2"]);
        }
        args.AddRange(["--nbd-server", $"addr.type=unix,addr.path={Path.Combine(_dir, "nbd.sock")}"]);
        foreach (var d in Drives)
        {
            args.AddRange(["--export", $"type=nbd,id=e{d},node-name={d},name={d},writable=on"]);
        }
        _daemon = await DaemonProcess.StartAsync(args, _dir);
        _qmp = await _daemon.ConnectAsync();
    }

    public Task DisposeAsync() => DaemonProcess.ShutdownAsync(_qmp, _daemon);

    private static Task<string> RunAsync(string file, params string[] args) => Tool.RunAsync(file, args);

    private string Uri(string drive) => $"nbd+unix:///{drive}?socket={Path.Combine(_dir, "nbd.sock")}";

    private async Task WriteAllAsync(byte pattern, long offset, long length) =>
        await Task.WhenAll(Drives.Select(d => RunAsync("qemu-io", "-f", "raw", Uri(d), "-c", $"write -P 0x{pattern:x2} {offset} {length}")));

    private async Task<Dictionary<string, string>> SnapshotAllAsync()
    {
        var snaps = new Dictionary<string, string>();
        foreach (var d in Drives)
        {
            var path = Path.Combine(_dir, $"snap{_files++}.raw");
            await RunAsync("qemu-img", "convert", "-f", "raw", "-O", "raw", Uri(d), path);
            snaps[d] = path;
        }
        return snaps;
    }

    private static JsonObject Action(string type, JsonObject data) => new() { ["type"] = type, ["data"] = data };

    private async Task<JsonObject> TransactionAsync(JsonArray actions, string? completionMode = null)
    {
        var args = new JsonObject { ["actions"] = actions };
        if (completionMode is not null)
        {
            args["properties"] = new JsonObject { ["completion-mode"] = completionMode };
        }
        return await Qmp.ExecuteAsync("transaction", args);
    }

    /// <summary>Collects job events until every job in <paramref name="ids"/> reached null; returns each job's sequence.</summary>
    private async Task<Dictionary<string, string>> WaitJobsAsync(params string[] ids)
    {
        var seq = ids.ToDictionary(i => i, _ => new List<string>());
        var done = new HashSet<string>();
        while (done.Count < ids.Length)
        {
            var e = await Qmp.NextEventAsync(TimeSpan.FromSeconds(60));
            var data = e["data"]!.AsObject();
            var id = (string?)(data["id"] ?? data["device"]);
            if (id is null || !seq.TryGetValue(id, out var list))
            {
                continue;
            }
            var name = e["event"]!.GetValue<string>();
            var step = name == "JOB_STATUS_CHANGE" ? data["status"]!.GetValue<string>() : name;
            list.Add(step);
            if (step == "null")
            {
                done.Add(id);
            }
        }
        return seq.ToDictionary(kv => kv.Key, kv => string.Join(' ', kv.Value));
    }

    private async Task<JsonObject?> BitmapAsync(string drive, string name)
    {
        var nodes = (await Qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        var node = nodes.First(n => n!["node-name"]!.GetValue<string>() == drive)!;
        return node["dirty-bitmaps"]?.AsArray().FirstOrDefault(b => b!["name"]?.GetValue<string>() == name)?.AsObject();
    }

    private string Target(string name) => Path.Combine(_dir, name + ".qcow2");

    [Fact]
    public async Task One_instant_for_three_drives_writes_after_it_land_in_no_backup_but_in_every_bitmap()
    {
        await WriteAllAsync(0x11, 0, 4 * MiB);
        var atStart = await SnapshotAllAsync();
        var actions = new JsonArray();
        foreach (var d in Drives)
        {
            actions.Add(Action("block-dirty-bitmap-add", new JsonObject { ["node"] = d, ["name"] = "b" }));
            actions.Add(Action("drive-backup", new JsonObject
            {
                ["job-id"] = "full-" + d, ["device"] = d, ["sync"] = "full", ["target"] = Target("full-" + d),
                ["format"] = "qcow2", ["speed"] = 4 * MiB,
            }));
        }
        (await TransactionAsync(actions)).Should().ContainKey("return");
        // While the speed-limited backups run: these writes are after the instant.
        await WriteAllAsync(0x22, 2 * MiB, MiB);
        var jobs = await WaitJobsAsync(Drives.Select(d => "full-" + d).ToArray());
        jobs.Values.Should().AllSatisfy(s => s.Should().EndWith("BLOCK_JOB_COMPLETED concluded null"));
        foreach (var d in Drives)
        {
            await RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", Target("full-" + d), atStart[d]);
            (await BitmapAsync(d, "b"))!["count"]!.GetValue<long>().Should().Be(MiB, "the bitmap holds exactly the writes made after the instant");
        }

        await WriteAllAsync(0x33, 8 * MiB, 64 * 1024);
        var beforeIncremental = await SnapshotAllAsync();
        var incrementals = new JsonArray();
        foreach (var d in Drives)
        {
            await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", "-b", Target("full-" + d), "-F", "qcow2", Target("inc-" + d));
            incrementals.Add(Action("drive-backup", new JsonObject
            {
                ["job-id"] = "inc-" + d, ["device"] = d, ["sync"] = "incremental", ["bitmap"] = "b",
                ["target"] = Target("inc-" + d), ["format"] = "qcow2", ["mode"] = "existing",
            }));
        }
        (await TransactionAsync(incrementals)).Should().ContainKey("return");
        (await WaitJobsAsync(Drives.Select(d => "inc-" + d).ToArray())).Values
            .Should().AllSatisfy(s => s.Should().EndWith("BLOCK_JOB_COMPLETED concluded null"));
        foreach (var d in Drives)
        {
            await RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", Target("inc-" + d), beforeIncremental[d]);
            (await BitmapAsync(d, "b"))!["count"]!.GetValue<long>().Should().Be(0);
        }
    }

    /// <summary>
    /// The acceptance test of multi-drive transactions: NBD clients write to all three drives while three incremental transactions
    /// run. Each client is one writer whose writes form a sequence (each acknowledged before the next is
    /// sent), so the backups of one instant must hold exactly a prefix of every writer's sequence, the
    /// same prefix on every drive: each chain equals a copy of its drive rebuilt from those prefixes.
    /// The writes wrap around a small region, so the jobs also copy old data before it is overwritten.
    /// Each transaction creates its targets, which is slow: without a drain the drives' instants drift
    /// apart by several writes, and a run of three transactions with four writers shows it.
    /// </summary>
    [Fact]
    public async Task Incremental_transactions_while_writers_write_to_every_drive_hold_one_prefix_of_their_writes()
    {
        const int Block = 4096, Region = 256 * 1024, Writers = 4, Rounds = 3;
        var full = new JsonArray();
        foreach (var d in Drives)
        {
            full.Add(Action("block-dirty-bitmap-add", new JsonObject { ["node"] = d, ["name"] = "b" }));
            full.Add(Action("drive-backup", new JsonObject
            {
                ["job-id"] = "full-" + d, ["device"] = d, ["sync"] = "full", ["target"] = Target("inc-0-" + d), ["format"] = "qcow2",
            }));
        }
        (await TransactionAsync(full)).Should().ContainKey("return");
        await WaitJobsAsync(Drives.Select(d => "full-" + d).ToArray());

        static (int Drive, int Offset) Slot(int w, int n) => (n % 3, w * Region + n / 3 * Block % Region);
        static void Fill(Span<byte> block, int w, int n)
        {
            block.Fill((byte)((w * 31 + n) % 251 + 1));
            BitConverter.TryWriteBytes(block, w);
            BitConverter.TryWriteBytes(block[4..], n);
        }
        var log = Enumerable.Range(0, Writers).Select(_ => new WriteLog()).ToArray();
        using var stop = new CancellationTokenSource();
        var writers = Enumerable.Range(0, Writers).Select(w => Task.Run(async () =>
        {
            var connections = new List<NbdConnection>();
            foreach (var d in Drives)
            {
                connections.Add(await NbdConnection.OpenAsync(Path.Combine(_dir, "nbd.sock"), d));
            }
            var block = new byte[Block];
            for (var n = 0; !stop.IsCancellationRequested; n++)
            {
                Fill(block, w, n);
                var (drive, offset) = Slot(w, n);
                log[w].Sending();
                await connections[drive].WriteAsync(offset, block);
                log[w].Acknowledged();
            }
            foreach (var c in connections)
            {
                await c.DisposeAsync();
            }
        })).ToArray();
        async Task WaitForMoreWritesAsync(int count)
        {
            var target = log.Sum(l => l.AckedCount) + count;
            while (log.Sum(l => l.AckedCount) < target)
            {
                writers.Should().NotContain(t => t.IsFaulted);
                await Task.Delay(5);
            }
        }

        var windows = new List<(long Before, long After)>();
        for (var round = 1; round <= Rounds; round++)
        {
            await WaitForMoreWritesAsync(1000);
            var incrementals = new JsonArray();
            foreach (var d in Drives)
            {
                incrementals.Add(Action("drive-backup", new JsonObject
                {
                    ["job-id"] = $"inc-{round}-{d}", ["device"] = d, ["sync"] = "incremental", ["bitmap"] = "b",
                    ["target"] = Target($"inc-{round}-{d}"), ["format"] = "qcow2",
                }));
            }
            var before = Stopwatch.GetTimestamp();
            (await TransactionAsync(incrementals)).Should().ContainKey("return");
            windows.Add((before, Stopwatch.GetTimestamp()));
            await WaitForMoreWritesAsync(500);
            (await WaitJobsAsync(Drives.Select(d => $"inc-{round}-{d}").ToArray())).Values
                .Should().AllSatisfy(s => s.Should().EndWith("BLOCK_JOB_COMPLETED concluded null"));
        }
        await WaitForMoreWritesAsync(1000);
        await stop.CancelAsync();
        await Task.WhenAll(writers);

        var instants = new int[Writers];
        for (var round = 1; round <= Rounds; round++)
        {
            // A writer's instant: its newest write the chains hold. With one write of it in flight at a
            // time, every older write was complete and every newer one not yet sent.
            var previous = instants.ToArray();
            Array.Clear(instants);
            foreach (var d in Drives)
            {
                await RunAsync("qemu-img", "rebase", "-u", "-b", Target($"inc-{round - 1}-{d}"), "-F", "qcow2", "-f", "qcow2", Target($"inc-{round}-{d}"));
                var raw = Path.Combine(_dir, $"chain-{round}-{d}.raw");
                await RunAsync("qemu-img", "convert", "-f", "qcow2", "-O", "raw", Target($"inc-{round}-{d}"), raw);
                var image = await File.ReadAllBytesAsync(raw);
                for (var o = 0; o < Writers * Region; o += Block)
                {
                    if (image.AsSpan(o, Block).ContainsAnyExcept((byte)0))
                    {
                        var w = BitConverter.ToInt32(image, o);
                        instants[w] = Math.Max(instants[w], BitConverter.ToInt32(image, o + 4) + 1);
                    }
                }
            }
            var (before, after) = windows[round - 1];
            for (var w = 0; w < Writers; w++)
            {
                log[w].AckedBefore(before).Should().BeLessThanOrEqualTo(instants[w], "every write acknowledged before transaction {0} was sent is in its backups", round);
                log[w].SentBefore(after).Should().BeGreaterThanOrEqualTo(instants[w], "no write sent after transaction {0} returned is in its backups", round);
                instants[w].Should().BeGreaterThan(previous[w]);
            }

            var copies = Drives.Select(_ => new byte[32 * MiB]).ToArray();
            for (var w = 0; w < Writers; w++)
            {
                for (var n = 0; n < instants[w]; n++)
                {
                    var (drive, offset) = Slot(w, n);
                    Fill(copies[drive].AsSpan(offset, Block), w, n);
                }
            }
            for (var i = 0; i < Drives.Length; i++)
            {
                var copy = Path.Combine(_dir, $"instant-{round}-{Drives[i]}.raw");
                await File.WriteAllBytesAsync(copy, copies[i]);
                await RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", Target($"inc-{round}-{Drives[i]}"), copy);
            }
        }

        // Every write after the last instant is in the bitmaps, and nothing else.
        for (var i = 0; i < Drives.Length; i++)
        {
            var dirty = Enumerable.Range(0, Writers)
                .SelectMany(w => Enumerable.Range(instants[w], log[w].AckedCount - instants[w]).Select(n => Slot(w, n)))
                .Where(s => s.Drive == i).Select(s => s.Offset / (64 * 1024)).Distinct().Count();
            (await BitmapAsync(Drives[i], "b"))!["count"]!.GetValue<long>().Should().Be(dirty * 64L * 1024);
        }
    }

    /// <summary>When each write of one writer was sent and acknowledged (Stopwatch timestamps).</summary>
    private sealed class WriteLog
    {
        private readonly List<long> _sent = [];
        private readonly List<long> _acked = [];

        public int AckedCount { get { lock (_sent) { return _acked.Count; } } }

        public void Sending() { lock (_sent) { _sent.Add(Stopwatch.GetTimestamp()); } }

        public void Acknowledged() { lock (_sent) { _acked.Add(Stopwatch.GetTimestamp()); } }

        public int AckedBefore(long timestamp) { lock (_sent) { return _acked.Count(t => t < timestamp); } }

        public int SentBefore(long timestamp) { lock (_sent) { return _sent.Count(t => t < timestamp); } }
    }

    /// <summary>
    /// A transaction is atomic for other clients too: while one client adds and removes a bitmap on all
    /// three drives in transactions and another races it with standalone adds and removes on one drive,
    /// a third client never sees the transaction's bitmap on some of the drives only, and every
    /// transaction either took effect everywhere or failed with the error of the action that clashed.
    /// </summary>
    [Fact]
    public async Task Other_clients_never_see_half_a_transaction()
    {
        await using var racer = await _daemon!.ConnectAsync();
        await using var observer = await _daemon.ConnectAsync();
        JsonArray All(string type) => new(Drives.Select(d => (JsonNode)Action(type, new JsonObject { ["node"] = d, ["name"] = "x" })).ToArray());
        using var stop = new CancellationTokenSource();
        var failures = new List<string>();
        var transactions = Task.Run(async () =>
        {
            for (var i = 0; i < 150; i++)
            {
                foreach (var type in new[] { "block-dirty-bitmap-add", "block-dirty-bitmap-remove" })
                {
                    var reply = await Qmp.ExecuteAsync("transaction", new JsonObject { ["actions"] = All(type) });
                    if (reply["error"]?["desc"]?.GetValue<string>() is { } desc)
                    {
                        failures.Add(desc);
                    }
                }
            }
        });
        var standalone = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                await racer.ExecuteAsync("block-dirty-bitmap-add", new { node = "d1", name = "x" });
                await racer.ExecuteAsync("block-dirty-bitmap-remove", new { node = "d1", name = "x" });
            }
        });
        var observations = new HashSet<string>();
        while (!transactions.IsCompleted)
        {
            var nodes = (await observer.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
            bool Has(string d) => nodes.First(n => n!["node-name"]!.GetValue<string>() == d)!["dirty-bitmaps"]?
                .AsArray().Any(b => b!["name"]!.GetValue<string>() == "x") == true;
            // d1 may carry the racer's own bitmap; d0 and d2 only ever change together.
            Has("d0").Should().Be(Has("d2"), "a transaction is seen whole or not at all");
            observations.Add($"{Has("d0")}");
        }
        await transactions;
        await stop.CancelAsync();
        await standalone;
        observations.Should().Contain(["True", "False"], "the observer ran while transactions came and went");
        failures.Should().NotBeEmpty("the racer clashed with some transactions").And
            .OnlyContain(f => f == "Bitmap already exists: x" || f == "Dirty bitmap 'x' not found");
    }

    [Fact]
    public async Task A_transaction_whose_third_action_is_invalid_leaves_no_trace()
    {
        await Qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "d0", name = "b" });
        await WriteAllAsync(0x44, 0, MiB);
        var actions = new JsonArray
        {
            Action("drive-backup", new JsonObject { ["job-id"] = "j0", ["device"] = "d0", ["sync"] = "incremental", ["bitmap"] = "b", ["target"] = Target("t0"), ["format"] = "qcow2" }),
            Action("block-dirty-bitmap-add", new JsonObject { ["node"] = "d1", ["name"] = "new" }),
            Action("drive-backup", new JsonObject { ["job-id"] = "j2", ["device"] = "d2", ["sync"] = "incremental", ["bitmap"] = "nosuch", ["target"] = Target("t2"), ["format"] = "qcow2" }),
        };
        var reply = await TransactionAsync(actions);
        reply["error"]!["desc"]!.GetValue<string>().Should().Be("Bitmap 'nosuch' could not be found");
        (await Qmp.ExecuteAsync("query-jobs"))["return"]!.AsArray().Should().BeEmpty();
        var b = (await BitmapAsync("d0", "b"))!;
        b["busy"]!.GetValue<bool>().Should().BeFalse();
        b["count"]!.GetValue<long>().Should().Be(MiB, "the prepared backup gave its bitmap back untouched");
        (await BitmapAsync("d1", "new")).Should().BeNull();
    }

    [Fact]
    public async Task Grouped_completion_cancels_the_others_when_one_target_fails_and_a_retry_covers_every_write()
    {
        foreach (var d in Drives)
        {
            await Qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = d, name = "b" });
        }
        await WriteAllAsync(0x55, 0, 2 * MiB);
        await RunAsync("qemu-img", "create", "-q", "-f", "qcow2", Target("bad"), "32M");
        (await Qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$$"""
            {"driver": "qcow2", "node-name": "tbad", "file": {"driver": "blkdebug",
             "image": {"driver": "file", "filename": "{{{Target("bad")}}}"},
             "inject-error": [{"event": "write_aio", "iotype": "write", "errno": 5}]}}
            """)!)).Should().ContainKey("return");
        var actions = new JsonArray();
        foreach (var d in Drives)
        {
            if (d == "d1")
            {
                actions.Add(Action("blockdev-backup", new JsonObject { ["job-id"] = "g-d1", ["device"] = d, ["target"] = "tbad", ["sync"] = "incremental", ["bitmap"] = "b" }));
                continue;
            }
            actions.Add(Action("drive-backup", new JsonObject
            {
                ["job-id"] = "g-" + d, ["device"] = d, ["sync"] = "incremental", ["bitmap"] = "b",
                ["target"] = Target("g-" + d), ["format"] = "qcow2",
            }));
        }
        (await TransactionAsync(actions, "grouped")).Should().ContainKey("return");
        var seq = await WaitJobsAsync("g-d0", "g-d1", "g-d2");
        seq["g-d1"].Should().Contain("BLOCK_JOB_ERROR").And.EndWith("BLOCK_JOB_COMPLETED concluded null");
        seq["g-d0"].Should().Contain("BLOCK_JOB_CANCELLED");
        seq["g-d2"].Should().Contain("BLOCK_JOB_CANCELLED");
        await WriteAllAsync(0x66, 4 * MiB, MiB);
        foreach (var d in Drives)
        {
            var b = (await BitmapAsync(d, "b"))!;
            b["busy"]!.GetValue<bool>().Should().BeFalse();
            b["count"]!.GetValue<long>().Should().Be(3 * MiB, "old bits and the writes made since are all kept");
        }

        var snaps = await SnapshotAllAsync();
        var retry = new JsonArray();
        foreach (var d in Drives)
        {
            retry.Add(Action("drive-backup", new JsonObject
            {
                ["job-id"] = "r-" + d, ["device"] = d, ["sync"] = "incremental", ["bitmap"] = "b",
                ["target"] = Target("r-" + d), ["format"] = "qcow2",
            }));
        }
        (await TransactionAsync(retry, "grouped")).Should().ContainKey("return");
        (await WaitJobsAsync("r-d0", "r-d1", "r-d2")).Values.Should().AllSatisfy(s => s.Should().EndWith("BLOCK_JOB_COMPLETED concluded null"));
        foreach (var d in Drives)
        {
            // The incremental alone (no backing) holds exactly the dirty data: compare the allocated part.
            var map = await RunAsync("qemu-img", "map", "--output=json", "-f", "qcow2", Target("r-" + d));
            var allocated = JsonNode.Parse(map)!.AsArray().Where(e => e!["data"]!.GetValue<bool>()).Sum(e => e!["length"]!.GetValue<long>());
            allocated.Should().Be(3 * MiB);
            (await BitmapAsync(d, "b"))!["count"]!.GetValue<long>().Should().Be(0);
        }
        snaps.Should().HaveCount(3);
    }

    [Fact]
    public async Task A_new_chain_clears_the_bitmap_exactly_at_the_full_backups_instant()
    {
        await Qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "d0", name = "b" });
        await WriteAllAsync(0x77, 0, 4 * MiB);
        var atStart = await SnapshotAllAsync();
        var reply = await TransactionAsync(new JsonArray
        {
            Action("block-dirty-bitmap-clear", new JsonObject { ["node"] = "d0", ["name"] = "b" }),
            Action("drive-backup", new JsonObject { ["job-id"] = "nc", ["device"] = "d0", ["sync"] = "full", ["target"] = Target("nc"), ["format"] = "qcow2", ["speed"] = 4 * MiB }),
        });
        reply.Should().ContainKey("return");
        (await BitmapAsync("d0", "b"))!["count"]!.GetValue<long>().Should().Be(0);
        await RunAsync("qemu-io", "-f", "raw", Uri("d0"), "-c", "write -P 0x78 1M 64k");
        (await WaitJobsAsync("nc"))["nc"].Should().EndWith("BLOCK_JOB_COMPLETED concluded null");
        await RunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", Target("nc"), atStart["d0"]);
        (await BitmapAsync("d0", "b"))!["count"]!.GetValue<long>().Should().Be(64 * 1024, "only the write after the instant");
    }
}
