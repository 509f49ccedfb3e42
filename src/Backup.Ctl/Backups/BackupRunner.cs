using System.Globalization;
using System.Text.Json.Nodes;
using Backup.Ctl.Chains;
using Backup.Ctl.Images;
using Backup.Qmp.Client;
using Spectre.Console;

namespace Backup.Ctl.Backups;

/// <summary>
/// <c>backupctl backup full|inc|diff</c>: creates each drive's target through QMP (qcow2, backed by the
/// previous backup for inc, by the last full for diff), starts every drive's job in one transaction (one
/// instant for all drives, completion-mode grouped), follows them, keeps the bitmaps right (see
/// <see cref="BackupBitmaps"/>), then digests the finished images and writes the manifest.
/// </summary>
public sealed class BackupRunner(QmpClient qmp, CtlOutput output)
{
    public int ChunkSize { get; init; } = ContentDigest.DefaultChunkSize;

    /// <summary>Each job's <c>speed</c> in bytes per second; 0 for none.</summary>
    public long Speed { get; init; }

    private sealed record Target(string Drive, string JobId, string Path, string Image, IReadOnlyList<string> Chain, long Size);

    public async Task<JsonObject> RunAsync(BackupKind kind, IReadOnlyList<string> drives, string dir, CancellationToken cancellationToken)
    {
        if (drives.Count == 0)
        {
            throw new CtlException("name at least one drive with --drive", ExitCodes.Usage);
        }
        if (drives.Distinct(StringComparer.Ordinal).Count() != drives.Count)
        {
            throw new CtlException("a drive is named twice", ExitCodes.Usage);
        }
        dir = Path.GetFullPath(dir);
        var chain = ChainFolder.Load(dir);
        var sequence = chain.NextSequence;
        var targets = await PlanAsync(kind, drives, chain, sequence, cancellationToken).ConfigureAwait(false);

        var created = new List<string>();
        try
        {
            Directory.CreateDirectory(dir);
            foreach (var t in targets)
            {
                await CreateTargetAsync(t, kind, created, cancellationToken).ConfigureAwait(false);
            }
        }
        catch (Exception e) when (e is CtlException or QmpErrorException or IOException or UnauthorizedAccessException)
        {
            Delete(created);
            var why = e is QmpErrorException q ? q.Desc : e.Message;
            throw await NotStartedAsync(kind, drives, "create-targets", why, cancellationToken).ConfigureAwait(false);
        }

        using var events = qmp.Listen();
        DateTimeOffset instant;
        try
        {
            await RemoveStalePendingAsync(kind, drives, cancellationToken).ConfigureAwait(false);
            await qmp.ExecuteAsync("transaction", Transaction(kind, targets), cancellationToken).ConfigureAwait(false);
            instant = DateTimeOffset.UtcNow;
        }
        catch (QmpErrorException e)
        {
            Delete(created);
            throw await NotStartedAsync(kind, drives, "transaction", e.Desc, cancellationToken).ConfigureAwait(false);
        }

        Dictionary<string, JobOutcome> outcomes;
        try
        {
            outcomes = await FollowAsync(events, targets, cancellationToken).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            // Interrupted (Ctrl-C): the jobs would go on in the daemon without anyone to settle the bitmaps or
            // write the manifest. Cancel them; a cancelled job gives its bitmap back like a failed one.
            outcomes = await CancelAsync(events, targets).ConfigureAwait(false);
            cancellationToken = CancellationToken.None;
        }
        var failed = targets.Where(t => outcomes[t.JobId].Error is not null).ToList();
        if (failed.Count > 0)
        {
            await ReportFailureAsync(kind, targets, failed, outcomes, created, cancellationToken).ConfigureAwait(false);
        }
        await SettleBitmapsAsync(kind, drives, cancellationToken).ConfigureAwait(false);

        var manifest = new Manifest
        {
            Sequence = sequence,
            Kind = kind.ToString().ToLowerInvariant(),
            Time = instant,
            Bitmap = kind switch { BackupKind.Inc => BackupBitmaps.SinceLast, BackupKind.Diff => BackupBitmaps.SinceFull, _ => null },
            ChunkSize = ChunkSize,
            Drives = await DigestAsync(targets, outcomes, cancellationToken).ConfigureAwait(false),
        };
        await manifest.WriteAsync(dir, cancellationToken).ConfigureAwait(false);
        output.Say($"{manifest.Kind} backup {sequence} of {string.Join(", ", drives)} done at {instant.ToString("u", CultureInfo.InvariantCulture)}: "
            + string.Join(", ", manifest.Drives.Select(d => $"{d.Image} ({Size(d.Copied)} copied)")));
        return new JsonObject
        {
            ["ok"] = true,
            ["kind"] = manifest.Kind,
            ["sequence"] = sequence,
            ["time"] = instant.ToString("O", CultureInfo.InvariantCulture),
            ["manifest"] = Manifest.FileName(sequence, kind),
            ["drives"] = new JsonArray(manifest.Drives.Select(d => (JsonNode)new JsonObject
            {
                ["drive"] = d.Drive, ["image"] = d.Image, ["copied"] = d.Copied, ["chain"] = new JsonArray(d.Chain.Select(c => (JsonNode)c!).ToArray()),
            }).ToArray()),
        };
    }

    private async Task<List<Target>> PlanAsync(BackupKind kind, IReadOnlyList<string> drives, ChainFolder chain, int sequence,
        CancellationToken cancellationToken)
    {
        var targets = new List<Target>();
        foreach (var drive in drives)
        {
            var node = await DaemonQueries.NodeAsync(qmp, drive, cancellationToken).ConfigureAwait(false);
            var size = DaemonQueries.VirtualSize(node);
            IReadOnlyList<string> baseChain = [];
            if (kind != BackupKind.Full)
            {
                var previous = chain.Latest(drive, kind == BackupKind.Diff ? BackupKind.Full : null)
                    ?? throw new CtlException($"no full backup of '{drive}' in {chain.Path}: make one with 'backupctl backup full'");
                baseChain = previous.Drive(drive)!.Chain;
                var bitmap = kind == BackupKind.Inc ? BackupBitmaps.SinceLast : BackupBitmaps.SinceFull;
                if (DaemonQueries.Bitmap(node, bitmap) is null)
                {
                    throw new CtlException($"drive '{drive}' has no bitmap '{bitmap}' (the daemon restarted, or the chain was made elsewhere): "
                        + "changes since the last backup are unknown; make a full backup");
                }
            }
            var image = Manifest.ImageName(drive, sequence, kind);
            var path = chain.PathOf(image);
            if (File.Exists(path))
            {
                throw new CtlException($"{path} exists already");
            }
            targets.Add(new Target(drive, string.Create(CultureInfo.InvariantCulture, $"backupctl-{sequence}-{drive}"), path, image,
                [.. baseChain, image], size));
        }
        return targets;
    }

    /// <summary>A host file (blockdev-create file), then a qcow2 image on it, backed by the chain's top.</summary>
    private async Task CreateTargetAsync(Target t, BackupKind kind, List<string> created, CancellationToken cancellationToken)
    {
        created.Add(t.Path);
        await DaemonQueries.CreateImageAsync(qmp, t.JobId + "-file",
            new JsonObject { ["driver"] = "file", ["filename"] = t.Path, ["size"] = 0 }, cancellationToken).ConfigureAwait(false);
        var qcow2 = new JsonObject
        {
            ["driver"] = "qcow2",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = t.Path },
            ["size"] = t.Size,
        };
        if (kind != BackupKind.Full)
        {
            // Relative to the image's folder, as QEMU resolves it: the chain folder can move.
            qcow2["backing-file"] = t.Chain[^2];
            qcow2["backing-fmt"] = "qcow2";
        }
        await DaemonQueries.CreateImageAsync(qmp, t.JobId + "-qcow2", qcow2, cancellationToken).ConfigureAwait(false);
    }

    private async Task RemoveStalePendingAsync(BackupKind kind, IReadOnlyList<string> drives, CancellationToken cancellationToken)
    {
        if (kind == BackupKind.Inc)
        {
            return;
        }
        foreach (var drive in drives)
        {
            var node = await DaemonQueries.NodeAsync(qmp, drive, cancellationToken).ConfigureAwait(false);
            if (DaemonQueries.Bitmap(node, BackupBitmaps.Pending) is not null)
            {
                // Left by a backupctl that was killed mid-backup: it belongs to no backup.
                await qmp.ExecuteAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = drive, ["name"] = BackupBitmaps.Pending }, cancellationToken)
                    .ConfigureAwait(false);
            }
        }
    }

    private JsonObject Transaction(BackupKind kind, List<Target> targets)
    {
        var actions = new JsonArray();
        foreach (var t in targets)
        {
            if (kind != BackupKind.Inc)
            {
                actions.Add(new JsonObject
                {
                    ["type"] = "block-dirty-bitmap-add",
                    ["data"] = new JsonObject { ["node"] = t.Drive, ["name"] = BackupBitmaps.Pending },
                });
            }
            var backup = new JsonObject
            {
                ["job-id"] = t.JobId,
                ["device"] = t.Drive,
                ["target"] = t.Path,
                ["format"] = "qcow2",
                ["mode"] = "existing",
            };
            if (Speed > 0)
            {
                backup["speed"] = Speed;
            }
            switch (kind)
            {
                case BackupKind.Full:
                    backup["sync"] = "full";
                    break;
                case BackupKind.Inc:
                    backup["sync"] = "incremental";
                    backup["bitmap"] = BackupBitmaps.SinceLast;
                    break;
                case BackupKind.Diff:
                    // backupd's "differential" spelled as QEMU has it, so that backupctl drives QSD too.
                    backup["sync"] = "bitmap";
                    backup["bitmap"] = BackupBitmaps.SinceFull;
                    backup["bitmap-mode"] = "never";
                    break;
            }
            actions.Add(new JsonObject { ["type"] = "drive-backup", ["data"] = backup });
        }
        var transaction = new JsonObject { ["actions"] = actions };
        if (kind == BackupKind.Inc)
        {
            // Each incremental job clears its bitmap when it succeeds; grouped, one drive failing fails them all
            // and every bitmap gets its bits back, so no drive's changes are lost with the images of a failed set.
            // Full and diff touch no permanent bitmap until every job has succeeded, so they need no grouping
            // (which QEMU refuses next to block-dirty-bitmap-add).
            transaction["properties"] = new JsonObject { ["completion-mode"] = "grouped" };
        }
        return transaction;
    }

    private async Task<Dictionary<string, JobOutcome>> FollowAsync(QmpEventListener events, List<Target> targets, CancellationToken cancellationToken)
    {
        var ids = targets.Select(t => t.JobId).ToList();
        if (!output.Interactive)
        {
            output.Say($"backing up {string.Join(", ", targets.Select(t => $"{t.Drive} → {t.Image}"))}");
            return await JobWatcher.WatchAsync(qmp, events, ids, null, cancellationToken).ConfigureAwait(false);
        }
        Dictionary<string, JobOutcome>? outcomes = null;
        await output.Console.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new DownloadedColumn(), new TransferSpeedColumn())
            .StartAsync(async ctx =>
            {
                var bars = targets.ToDictionary(t => t.JobId, t => ctx.AddTask(Markup.Escape($"{t.Drive} → {t.Image}"), maxValue: 1));
                outcomes = await JobWatcher.WatchAsync(qmp, events, ids, (id, current, total) =>
                {
                    var bar = bars[id];
                    bar.MaxValue = Math.Max(total, 1);
                    bar.Value = current;
                }, cancellationToken).ConfigureAwait(false);
                foreach (var (id, bar) in bars)
                {
                    if (outcomes[id].Error is null)
                    {
                        bar.Value = bar.MaxValue;
                    }
                    bar.StopTask();
                }
            }).ConfigureAwait(false);
        return outcomes!;
    }

    private async Task<Dictionary<string, JobOutcome>> CancelAsync(QmpEventListener events, List<Target> targets)
    {
        foreach (var t in targets)
        {
            try
            {
                await qmp.ExecuteAsync("block-job-cancel", new JsonObject { ["device"] = t.JobId, ["force"] = true }, CancellationToken.None)
                    .ConfigureAwait(false);
            }
            catch (QmpErrorException)
            {
                // Already finished.
            }
        }
        using var deadline = new CancellationTokenSource(TimeSpan.FromMinutes(1));
        return await JobWatcher.WatchAsync(qmp, events, targets.Select(t => t.JobId).ToList(), null, deadline.Token).ConfigureAwait(false);
    }

    /// <summary>
    /// After a failed job: the partial targets go, the pending bitmap goes, and the user is told what failed and
    /// what the bitmaps hold now (the daemon gave an incremental's bits back; full and diff never touched them).
    /// </summary>
    private async Task ReportFailureAsync(BackupKind kind, List<Target> targets, List<Target> failed,
        Dictionary<string, JobOutcome> outcomes, List<string> created, CancellationToken cancellationToken)
    {
        if (kind != BackupKind.Inc)
        {
            foreach (var t in targets)
            {
                await RemovePendingAsync(t.Drive, cancellationToken).ConfigureAwait(false);
            }
        }
        Delete(created);
        var what = string.Join("; ", failed.Select(t => $"{t.Drive}: {outcomes[t.JobId].Error}"));
        var (bitmaps, kept) = await BitmapStateAsync(kind, targets.Select(t => t.Drive), cancellationToken).ConfigureAwait(false);
        throw new CtlException($"{kind.ToString().ToLowerInvariant()} backup failed ({what}); its images were removed and {kept}.",
            ExitCodes.Failed, new JsonObject
            {
                ["stage"] = "jobs",
                ["failed"] = new JsonArray(failed.Select(t => (JsonNode)new JsonObject { ["drive"] = t.Drive, ["error"] = outcomes[t.JobId].Error }).ToArray()),
                ["bitmaps"] = bitmaps,
            });
    }

    private async Task<CtlException> NotStartedAsync(BackupKind kind, IEnumerable<string> drives, string stage, string why, CancellationToken cancellationToken)
    {
        var (bitmaps, kept) = await BitmapStateAsync(kind, drives, cancellationToken).ConfigureAwait(false);
        return new CtlException($"{kind.ToString().ToLowerInvariant()} backup not started: {why}. No bitmap was changed: {kept}.",
            ExitCodes.Failed, new JsonObject { ["stage"] = stage, ["bitmaps"] = bitmaps });
    }

    /// <summary>
    /// What the permanent bitmaps hold after a backup that did not happen, for the failure message: the one the
    /// next backup of this kind copies still has every change since the chain's last backup (the daemon gave a
    /// failed incremental's bits back; full and diff never touch them before success).
    /// </summary>
    private async Task<(JsonArray Bitmaps, string Kept)> BitmapStateAsync(BackupKind kind, IEnumerable<string> drives, CancellationToken cancellationToken)
    {
        var bitmap = kind == BackupKind.Diff ? BackupBitmaps.SinceFull : BackupBitmaps.SinceLast;
        var bitmaps = new JsonArray();
        var kept = new List<string>();
        foreach (var drive in drives)
        {
            JsonObject node;
            try
            {
                node = await DaemonQueries.NodeAsync(qmp, drive, cancellationToken).ConfigureAwait(false);
            }
            catch (CtlException)
            {
                continue;
            }
            foreach (var name in new[] { BackupBitmaps.SinceLast, BackupBitmaps.SinceFull })
            {
                if (DaemonQueries.Bitmap(node, name) is { } b)
                {
                    var count = b["count"]?.GetValue<long>() ?? 0;
                    bitmaps.Add(new JsonObject { ["drive"] = drive, ["bitmap"] = name, ["count"] = count });
                    if (name == bitmap)
                    {
                        kept.Add($"'{name}' on {drive} holds {Size(count)}");
                    }
                }
            }
        }
        var text = kept.Count == 0
            ? "the chain is as it was"
            : $"the bitmap kept every change ({string.Join(", ", kept)}), so the next {(kind == BackupKind.Diff ? "diff" : "inc")} copies everything since the last backup";
        return (bitmaps, text);
    }

    private async Task RemovePendingAsync(string drive, CancellationToken cancellationToken)
    {
        try
        {
            await qmp.ExecuteAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = drive, ["name"] = BackupBitmaps.Pending }, cancellationToken)
                .ConfigureAwait(false);
        }
        catch (QmpErrorException)
        {
            // Not there: nothing to undo.
        }
    }

    /// <summary>
    /// After success: the pending bitmap (every change since this backup's instant) becomes the content of the
    /// bitmaps this kind of backup resets — both after a full, the since-last one after a diff. An incremental's
    /// bitmap was already reset by the daemon.
    /// </summary>
    private async Task SettleBitmapsAsync(BackupKind kind, IReadOnlyList<string> drives, CancellationToken cancellationToken)
    {
        if (kind == BackupKind.Inc)
        {
            return;
        }
        string[] reset = kind == BackupKind.Full ? [BackupBitmaps.SinceFull, BackupBitmaps.SinceLast] : [BackupBitmaps.SinceLast];
        var actions = new JsonArray();
        foreach (var drive in drives)
        {
            var node = await DaemonQueries.NodeAsync(qmp, drive, cancellationToken).ConfigureAwait(false);
            foreach (var name in reset)
            {
                if (DaemonQueries.Bitmap(node, name) is null)
                {
                    // The pending bitmap records from before this add, and is merged in below.
                    await qmp.ExecuteAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = drive, ["name"] = name }, cancellationToken).ConfigureAwait(false);
                }
                actions.Add(new JsonObject { ["type"] = "block-dirty-bitmap-clear", ["data"] = new JsonObject { ["node"] = drive, ["name"] = name } });
                actions.Add(new JsonObject
                {
                    ["type"] = "block-dirty-bitmap-merge",
                    ["data"] = new JsonObject { ["node"] = drive, ["target"] = name, ["bitmaps"] = new JsonArray(BackupBitmaps.Pending) },
                });
            }
        }
        await qmp.ExecuteAsync("transaction", new JsonObject { ["actions"] = actions }, cancellationToken).ConfigureAwait(false);
        foreach (var drive in drives)
        {
            await qmp.ExecuteAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = drive, ["name"] = BackupBitmaps.Pending }, cancellationToken)
                .ConfigureAwait(false);
        }
    }

    private async Task<List<ManifestDrive>> DigestAsync(List<Target> targets, Dictionary<string, JobOutcome> outcomes, CancellationToken cancellationToken)
    {
        var drives = new List<ManifestDrive>();
        foreach (var t in targets)
        {
            await using var image = await ImageChain.OpenAsync(t.Path, cancellationToken: cancellationToken).ConfigureAwait(false);
            var digests = await ContentDigest.ComputeAsync(image.Top, ChunkSize, null, cancellationToken).ConfigureAwait(false);
            drives.Add(new ManifestDrive
            {
                Drive = t.Drive,
                Image = t.Image,
                Chain = t.Chain,
                VirtualSize = t.Size,
                Copied = outcomes[t.JobId].Copied,
                Sha256 = digests,
            });
        }
        return drives;
    }

    private static void Delete(IEnumerable<string> files)
    {
        foreach (var f in files)
        {
            try
            {
                File.Delete(f);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
            }
        }
    }

    internal static string Size(long bytes) => bytes switch
    {
        >= 1L << 30 => string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1L << 30):0.##} GiB"),
        >= 1L << 20 => string.Create(CultureInfo.InvariantCulture, $"{bytes / (double)(1L << 20):0.##} MiB"),
        >= 1L << 10 => string.Create(CultureInfo.InvariantCulture, $"{bytes / 1024.0:0.##} KiB"),
        _ => string.Create(CultureInfo.InvariantCulture, $"{bytes} B"),
    };
}
