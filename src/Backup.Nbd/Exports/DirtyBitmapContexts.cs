using Backup.Block;
using Backup.Block.Bitmaps;
using Backup.Nbd.Protocol;

namespace Backup.Nbd.Exports;

/// <summary>
/// The default <see cref="IMetaContextProvider"/>: offers the named dirty bitmaps of the block layer
/// as <c>qemu:dirty-bitmap:NAME</c> (QEMU docs/interop/nbd.txt), with QEMU 7.2's lookups and checks.
/// An exported bitmap is busy (no QMP command may change it) until the export goes away.
/// </summary>
public sealed class DirtyBitmapContextProvider(BlockGraph graph) : IMetaContextProvider
{
    public IExportMetaContext OpenBitmap(BlockNode exportNode, ExportBitmapReference bitmap, bool writableExport)
    {
        ArgumentNullException.ThrowIfNull(exportNode);
        ArgumentNullException.ThrowIfNull(bitmap);
        DirtyBitmap found;
        if (bitmap.Node is null)
        {
            // A bare name is searched on the exported node, then down its backing chain.
            found = Chain(exportNode).Select(n => n.TryGetDirtyBitmaps()?.Find(bitmap.Name)).FirstOrDefault(b => b is not null)
                ?? throw new BlockException($"Bitmap '{bitmap.Name}' is not found");
        }
        else
        {
            var node = graph.Find(bitmap.Node) ?? throw new BlockException($"Node '{bitmap.Node}' not found");
            found = node.TryGetDirtyBitmaps()?.Find(bitmap.Name) ?? throw new BlockException($"Dirty bitmap '{bitmap.Name}' not found");
        }
        found.Check(BitmapCheck.AllowReadOnly);
        if (!writableExport && !found.Node.ReadOnly && found.Enabled)
        {
            // A read-only export promises a stable view; a recording bitmap would change under the client.
            throw new BlockException($"Enabled bitmap '{bitmap.Name}' incompatible with readonly export");
        }
        found.SetBusy(true);
        return new Context(found);
    }

    /// <summary>The node, then its backing nodes; a raw format node passes the search on to its file.</summary>
    private static IEnumerable<BlockNode> Chain(BlockNode node)
    {
        for (BlockNode? n = node; n is not null;)
        {
            yield return n;
            n = n.Children.FirstOrDefault(c => c.Role == "backing")?.Node
                ?? (n.DriverName == "raw" ? n.Children.FirstOrDefault(c => c.Role == "file")?.Node : null);
        }
    }

    private sealed class Context(DirtyBitmap bitmap) : IExportMetaContext, IDisposable
    {
        private int _disposed;

        public string Name { get; } = NbdWire.QEMU_DIRTY_BITMAP_PREFIX + bitmap.Name;

        public ValueTask GetExtentsAsync(long offset, long length, int maxExtents, List<MetaExtent> extents, CancellationToken cancellationToken)
        {
            var bits = bitmap.Bits;
            var end = offset + length;
            var pos = offset;
            var added = 0;
            while (pos < end && added < maxExtents)
            {
                var dirty = pos < bits.Size && bits.Get(pos);
                var next = dirty ? bits.NextClean(pos, end - pos) : bits.NextDirty(pos, end - pos);
                if (next <= pos)
                {
                    next = end;
                }
                extents.Add(new MetaExtent(next - pos, dirty ? NbdWire.NBD_STATE_DIRTY : 0));
                added++;
                pos = next;
            }
            return ValueTask.CompletedTask;
        }

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                bitmap.SetBusy(false);
            }
        }
    }
}
