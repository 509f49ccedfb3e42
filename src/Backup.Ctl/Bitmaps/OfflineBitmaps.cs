using Backup.Block;
using Backup.Block.Bitmaps;
using Backup.Ctl.Images;

namespace Backup.Ctl.Bitmaps;

/// <summary>
/// Persistent bitmaps in a qcow2 image that no daemon has open, like <c>qemu-img info</c>/<c>qemu-img bitmap</c>:
/// the image is opened through the block layer's qcow2 driver, whose bitmaps-extension reader checks the
/// directory against QEMU's limits and loads each bitmap (an entry left in use becomes an inconsistent bitmap).
/// </summary>
public static class OfflineBitmaps
{
    public static async Task<List<BitmapView>> ListAsync(string image, CancellationToken cancellationToken)
    {
        await using var chain = await ImageChain.OpenAsync(image, cancellationToken: cancellationToken).ConfigureAwait(false);
        return Views(chain.Top, Path.GetFileName(image), withDigest: false);
    }

    public static async Task<(BitmapView Bitmap, List<string> Problems)> InspectAsync(string image, string name, CancellationToken cancellationToken)
    {
        await using var chain = await ImageChain.OpenAsync(image, cancellationToken: cancellationToken).ConfigureAwait(false);
        var view = Views(chain.Top, Path.GetFileName(image), withDigest: true).FirstOrDefault(v => v.Name == name)
            ?? throw new CtlException($"{image}: no bitmap '{name}'");
        var problems = new List<string>();
        if (view.Inconsistent)
        {
            problems.Add($"bitmap '{name}' is inconsistent: the image was not closed cleanly while it was in use, so it may miss writes");
        }
        if (view.Granularity < DirtyBitmapSet.MinGranularity || view.Granularity > DirtyBitmapSet.MaxGranularity
            || (view.Granularity & (view.Granularity - 1)) != 0)
        {
            problems.Add($"bitmap '{name}' has a bad granularity {view.Granularity}");
        }
        if (view.Count > chain.Size)
        {
            problems.Add($"bitmap '{name}' marks {view.Count} bytes of a {chain.Size}-byte disk");
        }
        return (view, problems);
    }

    /// <summary>Removes a stored bitmap: the image is opened read-write, the entry deleted, the image closed cleanly.</summary>
    public static async Task RemoveAsync(string image, string name, CancellationToken cancellationToken)
    {
        await using var chain = await ImageChain.OpenAsync(image, readOnly: false, cancellationToken).ConfigureAwait(false);
        var set = chain.Top.TryGetDirtyBitmaps();
        var bitmap = set?.Find(name) ?? throw new CtlException($"{image}: no bitmap '{name}'");
        if (bitmap.Persistent && chain.Top is IPersistentBitmapStore store)
        {
            await store.RemoveStoredAsync(name, cancellationToken).ConfigureAwait(false);
        }
        set!.Remove(name);
    }

    private static List<BitmapView> Views(BlockNode node, string shownAs, bool withDigest)
    {
        var set = node.TryGetDirtyBitmaps();
        if (set is null)
        {
            return [];
        }
        return set.Query().Where(i => i.Name is not null).Select(i => new BitmapView(shownAs, i.Name!, i.Count, i.Granularity,
            i.Recording, i.Busy, i.Persistent, i.Inconsistent, withDigest && !i.Inconsistent ? set.Sha256(i.Name!) : null)).ToList();
    }
}
