namespace Backup.Block;

/// <summary>
/// Sees every request that changes a node's data, on the node's single I/O path. Dirty bitmaps
/// observe completions; copy-before-write observes before the data reaches the driver.
/// </summary>
public interface IWriteObserver
{
    /// <summary>
    /// Runs before the request reaches the driver; the request waits for it. Throwing fails the
    /// request with that error and nothing is written.
    /// </summary>
    ValueTask BeforeWriteAsync(BlockNode node, long offset, long length, WriteKind kind, CancellationToken cancellationToken);

    /// <summary>Runs after the driver completed the request successfully. Must not block or throw.</summary>
    void AfterWrite(BlockNode node, long offset, long length, WriteKind kind);
}
