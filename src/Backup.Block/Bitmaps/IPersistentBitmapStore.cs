namespace Backup.Block.Bitmaps;

/// <summary>
/// A node that can keep its persistent dirty bitmaps in the image (qcow2's bitmaps extension). The node
/// loads them when it opens and stores them when it closes; these are the operations needed in between.
/// </summary>
public interface IPersistentBitmapStore
{
    /// <summary>
    /// QEMU's bdrv_can_store_new_dirty_bitmap: throws QSD's error ("Can't make bitmap 'x' persistent in
    /// 'node': reason") when a new persistent bitmap with this name and granularity could not be stored.
    /// </summary>
    void CheckCanStoreNew(string name, long granularity);

    /// <summary>Deletes a stored bitmap from the image now (block-dirty-bitmap-remove). No-op if it was never stored.</summary>
    ValueTask RemoveStoredAsync(string name, CancellationToken cancellationToken);

    /// <summary>
    /// Writes one persistent bitmap's current bits and its directory entry now, replacing what was stored
    /// for it. With <paramref name="inUse"/> the entry stays flagged in use (the node keeps changing it).
    /// </summary>
    ValueTask StoreAsync(DirtyBitmap bitmap, bool inUse, CancellationToken cancellationToken);
}
