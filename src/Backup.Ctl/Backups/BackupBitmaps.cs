namespace Backup.Ctl.Backups;

/// <summary>
/// The dirty bitmaps backupctl keeps on each drive it backs up. Two are permanent:
/// <list type="bullet">
/// <item><see cref="SinceFull"/>: every change since the last full backup; a differential copies it (sync
/// differential leaves it as it is).</item>
/// <item><see cref="SinceLast"/>: every change since the last backup of any kind; an incremental copies it
/// (sync incremental: the daemon clears what it copied on success and puts everything back on failure).</item>
/// </list>
/// A full or differential backup adds <see cref="Pending"/> in its transaction, at the backup's instant; only
/// when every job has succeeded does it become the new content of the bitmaps that backup resets (merged into
/// them after a clear), so a failed backup leaves both permanent bitmaps holding everything they held.
/// </summary>
public static class BackupBitmaps
{
    public const string SinceFull = "backupctl-full";
    public const string SinceLast = "backupctl-inc";
    public const string Pending = "backupctl-pending";
}
