using System.Text.Json.Nodes;
using Backup.Qmp.Commands;

namespace Backup.Jobs.Commands;

/// <summary>blockdev-backup and drive-backup (schemas/backup.json): bind and call <see cref="BackupStarter"/>.</summary>
public sealed class BackupCommands(BackupStarter starter) : ICommandModule
{
    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("blockdev-backup", (a, _, _) =>
        {
            starter.StartBlockdevBackup(BindBlockdev(a));
            return ValueTask.FromResult<JsonNode?>(null);
        });
        table.Add("drive-backup", async (a, _, ct) =>
        {
            await starter.StartDriveBackupAsync(BindDrive(a), ct).ConfigureAwait(false);
            return null;
        });
    }

    /// <summary>blockdev-backup's arguments (BlockdevBackup).</summary>
    public static BackupRequest BindBlockdev(JsonObject a) => Bind(a) with { Target = a["target"]!.GetValue<string>() };

    /// <summary>drive-backup's arguments (DriveBackup).</summary>
    public static BackupRequest BindDrive(JsonObject a) => Bind(a) with
    {
        TargetFile = a["target"]!.GetValue<string>(),
        Format = Str(a, "format"),
        Mode = Str(a, "mode"),
    };

    /// <summary>The BackupCommon members.</summary>
    public static BackupRequest Bind(JsonObject a)
    {
        ArgumentNullException.ThrowIfNull(a);
        var perf = a["x-perf"] as JsonObject;
        return new BackupRequest
        {
            JobId = Str(a, "job-id"),
            Device = a["device"]!.GetValue<string>(),
            Sync = a["sync"]!.GetValue<string>(),
            Speed = a["speed"]?.GetValue<long>(),
            Bitmap = Str(a, "bitmap"),
            BitmapMode = Str(a, "bitmap-mode"),
            Compress = a["compress"]?.GetValue<bool>() ?? false,
            DiscardSource = a["discard-source"]?.GetValue<bool>() ?? false,
            OnSourceError = Str(a, "on-source-error"),
            OnTargetError = Str(a, "on-target-error"),
            AutoFinalize = a["auto-finalize"]?.GetValue<bool>() ?? true,
            AutoDismiss = a["auto-dismiss"]?.GetValue<bool>() ?? true,
            MaxWorkers = perf?["max-workers"]?.GetValue<long>(),
            MaxChunk = perf?["max-chunk"]?.GetValue<long>(),
            FilterNodeName = Str(a, "filter-node-name"),
            OnCbwError = Str(a, "on-cbw-error"),
            UseCopyRange = perf?["use-copy-range"]?.GetValue<bool>() ?? false,
            MinClusterSize = perf?["min-cluster-size"] is { } m ? (m.AsValue().TryGetValue<ulong>(out var u) ? u : (ulong)m.GetValue<long>()) : null,
        };
    }

    private static string? Str(JsonObject a, string key) => a[key]?.GetValue<string>();
}
