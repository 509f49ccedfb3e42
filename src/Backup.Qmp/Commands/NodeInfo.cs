using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Qmp.Commands;

/// <summary>
/// A node as query-named-block-nodes reports it (QEMU's BlockDeviceInfo), member for member in QSD's
/// order, so that a diff against qemu-storage-daemon shows only real differences.
/// </summary>
public static class NodeInfo
{
    public static JsonObject Describe(BlockNode node, bool flat)
    {
        ArgumentNullException.ThrowIfNull(node);
        var image = node.GetImageInfo();
        var o = new JsonObject
        {
            ["iops_rd"] = 0,
            ["detect_zeroes"] = node.DetectZeroes.ToString().ToLowerInvariant(),
            ["image"] = Image(image, flat),
            ["iops_wr"] = 0,
            ["ro"] = node.ReadOnly,
            ["node-name"] = node.NodeName,
            // QEMU counts the depth while it walks the chain for backing-image, a walk flat skips: 0.
            ["backing_file_depth"] = flat ? 0 : BackingDepth(node),
            ["drv"] = node.DriverName,
            ["iops"] = 0,
            ["bps_wr"] = 0,
            ["write_threshold"] = 0,
        };
        if (BitmapCommands.Describe(node) is { } bitmaps)
        {
            o["dirty-bitmaps"] = bitmaps;
        }
        if (image.BackingFilename is { } backing)
        {
            o["backing_file"] = backing;
        }
        o["encrypted"] = false;
        o["bps"] = 0;
        o["bps_rd"] = 0;
        o["cache"] = new JsonObject
        {
            ["no-flush"] = node.CacheNoFlush,
            ["direct"] = node.CacheDirect,
            ["writeback"] = true,
        };
        o["file"] = node.Filename;
        return o;
    }

    private static int BackingDepth(BlockNode node)
    {
        var depth = 0;
        for (var n = Backing(node); n is not null; n = Backing(n))
        {
            depth++;
        }
        return depth;
    }

    /// <summary>The next layer down: the backing child, or a filter's file child (bdrv_filter_or_cow_bs).</summary>
    private static BlockNode? Backing(BlockNode node) =>
        node.IsFilter ? node.PrimaryChild : node.Children.FirstOrDefault(c => c.Role == "backing")?.Node;

    private static JsonObject Image(ImageInfo i, bool flat)
    {
        var o = new JsonObject
        {
            // QEMU keeps lengths in 512-byte sectors (bdrv_getlength), so an image file whose size is
            // not a multiple of 512 (a fresh qcow2 file: 196616 bytes) shows the size rounded up.
            ["virtual-size"] = (i.VirtualSize + 511) / 512 * 512,
            ["filename"] = i.Filename,
        };
        if (i.ClusterSize is { } cs)
        {
            o["cluster-size"] = cs;
        }
        o["format"] = i.Format;
        if (i.ActualSize is { } actual)
        {
            o["actual-size"] = actual;
        }
        if (i.FormatSpecific is { } fs)
        {
            o["format-specific"] = new JsonObject { ["type"] = fs.Type, ["data"] = JsonValues.From(fs.Data) };
        }
        if (i.FullBackingFilename is { } full)
        {
            o["full-backing-filename"] = full;
        }
        if (i.BackingFilename is { } b)
        {
            o["backing-filename"] = b;
        }
        if (i.BackingFilenameFormat is { } bf)
        {
            o["backing-filename-format"] = bf;
        }
        if (!flat && i.BackingImage is { } bi)
        {
            o["backing-image"] = Image(bi, flat);
        }
        if (i.DirtyFlag is { } dirty)
        {
            o["dirty-flag"] = dirty;
        }
        return o;
    }
}
