using Backup.Block;
using Backup.Nbd.Protocol;

namespace Backup.Nbd.Exports;

/// <summary>One extent of a metadata context: <paramref name="Length"/> bytes sharing the same status flags.</summary>
public readonly record struct MetaExtent(long Length, uint Flags);

/// <summary>
/// A metadata context an export offers to NBD_OPT_SET_META_CONTEXT and answers NBD_CMD_BLOCK_STATUS
/// with (proto.md "Metadata querying"). The server owns the wire format; a context only describes
/// extents. Implementations must be safe to call from many connections at once.
/// </summary>
public interface IExportMetaContext
{
    /// <summary>The full context name, e.g. <c>qemu:dirty-bitmap:bitmap0</c>.</summary>
    string Name { get; }

    /// <summary>
    /// Appends extents describing [<paramref name="offset"/>, offset + <paramref name="length"/>) to
    /// <paramref name="extents"/>, in order, starting exactly at <paramref name="offset"/>. It may stop
    /// early (after <paramref name="maxExtents"/> extents, or whenever convenient) but must append at
    /// least one extent of non-zero length and never describe bytes past offset + length.
    /// </summary>
    ValueTask GetExtentsAsync(long offset, long length, int maxExtents, List<MetaExtent> extents, CancellationToken cancellationToken);
}

/// <summary>How block-export-add names a bitmap in <c>bitmaps</c>: a bare name, or a node and a name.</summary>
/// <param name="Node">The node holding the bitmap; null for the bare-name form, which searches the exported node and its backing chain.</param>
public sealed record ExportBitmapReference(string? Node, string Name);

/// <summary>
/// The seam through which the dirty-bitmap module offers <c>qemu:dirty-bitmap:NAME</c> contexts. It is
/// registered with <see cref="Server.NbdServer"/> (or the NBD command module) by the host.
/// </summary>
public interface IMetaContextProvider
{
    /// <summary>
    /// Resolves one entry of block-export-add's <c>bitmaps</c> for an export of <paramref name="exportNode"/>
    /// and pins it for the export's lifetime. Throws <see cref="BlockException"/> with QSD's wording
    /// ("Bitmap 'x' is not found", "Node 'x' not found", "Dirty bitmap 'x' not found",
    /// "Enabled bitmap 'x' incompatible with readonly export", busy/inconsistent bitmaps).
    /// The context's <see cref="IExportMetaContext.Name"/> must be <c>qemu:dirty-bitmap:</c> + the bitmap name;
    /// extents use <c>NBD_STATE_DIRTY</c> (1) for dirty. If the returned object is <see cref="IDisposable"/>,
    /// it is disposed when the export goes away (release the pin there).
    /// </summary>
    IExportMetaContext OpenBitmap(BlockNode exportNode, ExportBitmapReference bitmap, bool writableExport);
}

/// <summary>
/// <c>base:allocation</c> (proto.md "base:allocation metadata context"): NBD_STATE_HOLE where the node
/// stores no data, NBD_STATE_ZERO where it reads as zeros.
/// </summary>
internal sealed class BaseAllocationContext(BlockNode node) : IExportMetaContext
{
    public string Name => NbdWire.BASE_ALLOCATION;

    public ValueTask GetExtentsAsync(long offset, long length, int maxExtents, List<MetaExtent> extents, CancellationToken cancellationToken) =>
        StatusExtents.CollectAsync(node, offset, length, maxExtents, extents, static s =>
            (s.IsData ? 0 : NbdWire.NBD_STATE_HOLE) | (s.IsZero ? NbdWire.NBD_STATE_ZERO : 0), cancellationToken);
}

/// <summary>
/// <c>qemu:allocation-depth</c> (QEMU docs/interop/nbd.txt): 0 where no layer of the chain allocates the
/// extent, 1 where the exported node itself does, 2 and more for backing layers.
/// </summary>
internal sealed class AllocationDepthContext(BlockNode node) : IExportMetaContext
{
    public string Name => NbdWire.QEMU_ALLOCATION_DEPTH;

    public ValueTask GetExtentsAsync(long offset, long length, int maxExtents, List<MetaExtent> extents, CancellationToken cancellationToken) =>
        StatusExtents.CollectAsync(node, offset, length, maxExtents, extents, static s =>
            s.IsAllocated || s.Depth > 0 ? (uint)Math.Max(s.Depth, 1) : 0u, cancellationToken);
}

internal static class StatusExtents
{
    /// <summary>Walks block status from <paramref name="offset"/>, merging neighbours with equal flags.</summary>
    public static async ValueTask CollectAsync(BlockNode node, long offset, long length, int maxExtents, List<MetaExtent> extents,
        Func<BlockStatus, uint> flagsOf, CancellationToken cancellationToken)
    {
        var start = extents.Count;
        var pos = offset;
        var end = offset + length;
        while (pos < end)
        {
            var status = await node.GetBlockStatusAsync(pos, end - pos, cancellationToken).ConfigureAwait(false);
            var n = Math.Min(status.Length, end - pos);
            if (n <= 0)
            {
                // A driver that cannot say: describe the rest as plain data rather than loop forever.
                n = end - pos;
                status = new BlockStatus(n, BlockStatusFlags.Data | BlockStatusFlags.Allocated);
            }
            var flags = flagsOf(status);
            if (extents.Count > start && extents[^1].Flags == flags)
            {
                extents[^1] = extents[^1] with { Length = extents[^1].Length + n };
            }
            else
            {
                if (extents.Count - start >= maxExtents)
                {
                    return;
                }
                extents.Add(new MetaExtent(n, flags));
            }
            pos += n;
        }
    }
}
