namespace Backup.Block.Bitmaps;

/// <summary>
/// A node that can keep a persistent bitmap crash-consistent (our extension, see
/// <see cref="CrashConsistentTracker"/>): after a crash the stored bitmap is still a superset of every
/// write that reached the disk, instead of coming back inconsistent.
/// </summary>
public interface ICrashConsistentBitmapStore
{
    /// <summary>Throws the error to report when no bitmap of this node can be kept crash-consistent.</summary>
    void CheckCanKeepCrashConsistent(string name);

    /// <summary>
    /// Stores the persistent bitmap now and journals it from then on. No write to the node may be in
    /// flight (the caller drains it), so that none slips between the store and the journal.
    /// </summary>
    ValueTask KeepCrashConsistentAsync(DirtyBitmap bitmap, CancellationToken cancellationToken);
}
