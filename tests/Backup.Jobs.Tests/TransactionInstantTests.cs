using System.Buffers.Binary;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Jobs.Commands;
using Backup.Qmp.Commands;
using Backup.Qmp.Schema;
using Backup.Qmp.Transactions;

namespace Backup.Jobs.Tests;

/// <summary>
/// One instant across drives: a writer stamps sequence numbers on three drives in a fixed round
/// (d0, d1, d2, d0, ...) while a transaction starts a backup of each. If the backups share one point
/// in time, each holds a prefix of the sequence and the prefixes differ by at most one round position:
/// n0 ≥ n1 ≥ n2 ≥ n0 − 1. A later point in time for d1 or d2 would show as n1 &gt; n0 or n2 &gt; n1.
/// </summary>
public sealed class TransactionInstantTests : IAsyncLifetime
{
    private const int Slot = 4096;
    private const int Slots = 16384;
    private static readonly string[] Drives = ["d0", "d1", "d2"];
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("bkd-instant");
    private readonly BlockGraph _graph = BlockGraph.CreateDefault();
    private readonly EventLog _log = new();

    public async Task InitializeAsync()
    {
        foreach (var name in Drives.Concat(Drives.Select(d => "t" + d)))
        {
            var path = Path.Combine(_dir.FullName, name + ".img");
            await using (var f = File.Create(path))
            {
                f.SetLength((long)Slot * Slots);
            }
            await _graph.AddAsync(new BlockOptions
            {
                ["driver"] = "raw",
                ["node-name"] = name,
                ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = path },
            });
        }
    }

    public async Task DisposeAsync()
    {
        await _graph.CloseAllAsync();
        _dir.Delete(recursive: true);
    }

    [Fact]
    public async Task Backups_of_one_transaction_share_one_point_in_time_while_a_guest_writes()
    {
        var jobs = new JobManager(() => _log);
        var table = new CommandTable();
        new TransactionCommands([new BackupTransactionActions(new BackupStarter(_graph, jobs), jobs)], _graph).Register(table);
        table.TryGet("transaction", out var transaction).Should().BeTrue();

        using var stop = new CancellationTokenSource();
        var written = 0;
        var writer = Task.Run(async () =>
        {
            var stamp = new byte[8];
            for (var seq = 1; seq < Slots && !stop.IsCancellationRequested; seq++)
            {
                BinaryPrimitives.WriteInt64LittleEndian(stamp, seq);
                foreach (var d in Drives)
                {
                    await _graph.Find(d)!.WriteAsync((long)seq * Slot, stamp);
                }
                Volatile.Write(ref written, seq);
            }
        });
        while (Volatile.Read(ref written) < 100)
        {
            await Task.Delay(1);
        }

        var actions = new JsonArray(Drives.Select(d => (JsonNode)new JsonObject
        {
            ["type"] = "blockdev-backup",
            ["data"] = new JsonObject { ["job-id"] = "j" + d, ["device"] = d, ["target"] = "t" + d, ["sync"] = "full" },
        }).ToArray());
        var args = InputValidator.ValidateArguments(new JsonObject { ["actions"] = actions }, SchemaLoader.Default.Commands["transaction"].Arguments);
        await transaction(args, new CommandContext(null), default);
        await Task.Delay(50); // let the guest go on writing while the jobs copy
        await stop.CancelAsync();
        await writer;
        foreach (var d in Drives)
        {
            await _log.WaitForAsync(l => l.Sequence("j" + d).EndsWith("null", StringComparison.Ordinal));
            _log.Sequence("j" + d).Should().Contain("BLOCK_JOB_COMPLETED");
        }

        var prefix = new long[Drives.Length];
        for (var i = 0; i < Drives.Length; i++)
        {
            var image = new byte[Slot * Slots];
            await _graph.Find("t" + Drives[i])!.ReadAsync(0, image);
            var seen = Enumerable.Range(1, Slots - 1).Select(s => BinaryPrimitives.ReadInt64LittleEndian(image.AsSpan(s * Slot, 8))).ToList();
            var n = seen.TakeWhile((v, k) => v == k + 1).Count();
            seen.Skip(n).All(v => v == 0).Should().BeTrue($"backup of {Drives[i]} holds a prefix of the writes");
            prefix[i] = n;
        }
        prefix[0].Should().BeGreaterThanOrEqualTo(prefix[1]);
        prefix[1].Should().BeGreaterThanOrEqualTo(prefix[2]);
        prefix[2].Should().BeGreaterThanOrEqualTo(prefix[0] - 1, $"prefixes {string.Join(", ", prefix)} come from one instant");
    }
}
