namespace Backup.Ctl.Chains;

/// <summary>The backups in one chain folder, in the order they were made.</summary>
public sealed class ChainFolder
{
    private ChainFolder(string path, IReadOnlyList<Manifest> backups)
    {
        Path = path;
        Backups = backups;
    }

    public string Path { get; }

    public IReadOnlyList<Manifest> Backups { get; }

    public static ChainFolder Load(string dir)
    {
        var full = System.IO.Path.GetFullPath(dir);
        if (!Directory.Exists(full))
        {
            return new ChainFolder(full, []);
        }
        var manifests = Directory.EnumerateFiles(full, "*.json")
            .Where(f => char.IsAsciiDigit(System.IO.Path.GetFileName(f)[0]))
            .Select(Manifest.Read)
            .OrderBy(m => m.Sequence)
            .ToList();
        return new ChainFolder(full, manifests);
    }

    public int NextSequence => Backups.Count == 0 ? 1 : Backups[^1].Sequence + 1;

    /// <summary>The newest backup of <paramref name="drive"/> (of <paramref name="kind"/>, if given).</summary>
    public Manifest? Latest(string drive, BackupKind? kind = null) =>
        Backups.LastOrDefault(m => m.Drive(drive) is not null && (kind is null || m.ParsedKind == kind));

    /// <summary>
    /// The backup of <paramref name="drive"/> to restore: the newest, or the newest made at or before
    /// <paramref name="at"/> (a time, or a sequence number).
    /// </summary>
    public Manifest? Select(string drive, string? at)
    {
        var withDrive = Backups.Where(m => m.Drive(drive) is not null).ToList();
        if (at is null)
        {
            return withDrive.LastOrDefault();
        }
        if (int.TryParse(at, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var seq))
        {
            return withDrive.FirstOrDefault(m => m.Sequence == seq);
        }
        if (!DateTimeOffset.TryParse(at, System.Globalization.CultureInfo.InvariantCulture,
                System.Globalization.DateTimeStyles.AssumeUniversal, out var time))
        {
            throw new CtlException($"--at {at}: expected a time (2026-01-31T12:00:00Z) or a backup's sequence number", ExitCodes.Usage);
        }
        return withDrive.LastOrDefault(m => m.Time <= time);
    }

    public string PathOf(string image) => System.IO.Path.Combine(Path, image);
}
