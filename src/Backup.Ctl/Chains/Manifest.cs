using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace Backup.Ctl.Chains;

/// <summary>The kinds of backup backupctl makes.</summary>
public enum BackupKind
{
    /// <summary>Everything; starts a chain.</summary>
    Full,
    /// <summary>What changed since the previous backup of any kind; backed by it.</summary>
    Inc,
    /// <summary>What changed since the last full backup; backed by it.</summary>
    Diff,
}

/// <summary>
/// What one backup left in the chain folder, written as <c>NNNN-KIND.json</c> beside its images once every
/// image is complete: a backup without a manifest did not happen. Image names are relative to the folder, so
/// a chain folder can be moved or copied as a whole.
/// </summary>
public sealed record Manifest
{
    public const string FormatName = "backupctl-manifest";

    [JsonPropertyName("format")] public string Format { get; init; } = FormatName;
    [JsonPropertyName("version")] public int Version { get; init; } = 1;
    /// <summary>1, 2, 3, ...: the order backups were made in, and the prefix of their file names.</summary>
    [JsonPropertyName("sequence")] public required int Sequence { get; init; }
    [JsonPropertyName("kind")] public required string Kind { get; init; }
    /// <summary>The backup's point in time (UTC): when the transaction that started its jobs returned.</summary>
    [JsonPropertyName("time")] public required DateTimeOffset Time { get; init; }
    /// <summary>The dirty bitmap (on every drive) that said what to copy; null for full backups.</summary>
    [JsonPropertyName("bitmap")] public string? Bitmap { get; init; }
    [JsonPropertyName("chunk-size")] public required int ChunkSize { get; init; }
    [JsonPropertyName("drives")] public required IReadOnlyList<ManifestDrive> Drives { get; init; }

    private static readonly JsonSerializerOptions Options = new() { WriteIndented = true };

    public static string FileName(int sequence, BackupKind kind) =>
        string.Create(CultureInfo.InvariantCulture, $"{sequence:D4}-{kind.ToString().ToLowerInvariant()}.json");

    public static string ImageName(string drive, int sequence, BackupKind kind) =>
        string.Create(CultureInfo.InvariantCulture, $"{drive}-{sequence:D4}-{kind.ToString().ToLowerInvariant()}.qcow2");

    public BackupKind ParsedKind => Enum.Parse<BackupKind>(Kind, ignoreCase: true);

    public ManifestDrive? Drive(string name) => Drives.FirstOrDefault(d => d.Drive == name);

    /// <summary>Writes the manifest atomically (a temporary file renamed into place).</summary>
    public async Task WriteAsync(string dir, CancellationToken cancellationToken)
    {
        var path = Path.Combine(dir, FileName(Sequence, ParsedKind));
        var tmp = path + ".tmp";
        await File.WriteAllBytesAsync(tmp, JsonSerializer.SerializeToUtf8Bytes(this, Options), cancellationToken).ConfigureAwait(false);
        File.Move(tmp, path, overwrite: false);
    }

    public static Manifest Read(string path)
    {
        try
        {
            var m = JsonSerializer.Deserialize<Manifest>(File.ReadAllBytes(path))
                ?? throw new CtlException($"{path}: empty manifest");
            if (m.Format != FormatName)
            {
                throw new CtlException($"{path}: not a backupctl manifest");
            }
            return m;
        }
        catch (JsonException e)
        {
            throw new CtlException($"{path}: bad manifest: {e.Message}");
        }
    }
}

/// <summary>One drive of a backup.</summary>
public sealed record ManifestDrive
{
    /// <summary>The daemon's node name of the drive.</summary>
    [JsonPropertyName("drive")] public required string Drive { get; init; }
    /// <summary>This backup's image of the drive.</summary>
    [JsonPropertyName("image")] public required string Image { get; init; }
    /// <summary>The images to read the drive from, base first, this backup's image last.</summary>
    [JsonPropertyName("chain")] public required IReadOnlyList<string> Chain { get; init; }
    [JsonPropertyName("virtual-size")] public required long VirtualSize { get; init; }
    /// <summary>Bytes the job copied (BLOCK_JOB_COMPLETED's len).</summary>
    [JsonPropertyName("copied")] public long Copied { get; init; }
    /// <summary>SHA-256 of each chunk of the drive's content as of the backup (hex).</summary>
    [JsonPropertyName("sha256")] public required IReadOnlyList<string> Sha256 { get; init; }
}
