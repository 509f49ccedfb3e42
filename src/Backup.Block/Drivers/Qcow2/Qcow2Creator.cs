using System.Buffers.Binary;

namespace Backup.Block.Drivers.Qcow2;

public enum Qcow2Version
{
    V2,
    V3,
}

public enum Qcow2Preallocation
{
    Off,
    /// <summary>Every guest cluster mapped (L2 tables and host clusters allocated), the data not written.</summary>
    Metadata,
}

/// <summary>What a new qcow2 image looks like (the members of QEMU's BlockdevCreateOptionsQcow2 we support).</summary>
public sealed record Qcow2CreateOptions
{
    public required long Size { get; init; }
    public int ClusterSize { get; init; } = 65536;
    public string? BackingFile { get; init; }
    public string? BackingFormat { get; init; }
    public Qcow2Version Version { get; init; } = Qcow2Version.V3;
    public Qcow2Preallocation Preallocation { get; init; } = Qcow2Preallocation.Off;
    public bool LazyRefcounts { get; init; }
    public int RefcountBits { get; init; } = 16;

    /// <summary>An external data file for the guest data (v3 only); its name goes into the header.</summary>
    public BlockNode? DataFile { get; init; }

    /// <summary>The data file stays a plain raw image (autoclear bit data-file-raw); implies metadata preallocation.</summary>
    public bool DataFileRaw { get; init; }
}

/// <summary>
/// Writes a new, empty qcow2 image onto a node (blockdev-create's job). The layout is qemu-img's:
/// header in cluster 0, then the refcount table, the refcount blocks and the L1 table, so images
/// look the same as theirs to qemu-img info and check.
/// </summary>
public static class Qcow2Creator
{
    public static async Task CreateAsync(BlockNode file, Qcow2CreateOptions options, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(file);
        ArgumentNullException.ThrowIfNull(options);
        Validate(options, options.DataFile is not null);
        if (options.Size < 0)
        {
            throw new BlockException("Could not resize image: Image size cannot be negative");
        }
        if (options.DataFileRaw && options.Preallocation == Qcow2Preallocation.Off)
        {
            // A raw data file is only raw if every guest cluster maps to its own offset in it.
            options = options with { Preallocation = Qcow2Preallocation.Metadata };
        }
        var cs = options.ClusterSize;
        var clusterBits = System.Numerics.BitOperations.Log2((uint)cs);
        var refcountOrder = System.Numerics.BitOperations.Log2((uint)options.RefcountBits);
        var v3 = options.Version == Qcow2Version.V3;

        var l2Coverage = (long)cs * (cs / 8);
        var l1Size = (options.Size + l2Coverage - 1) / l2Coverage;
        if (l1Size * 8 > 32L << 20)
        {
            throw new BlockException("Image size too large for this cluster size");
        }
        var l1Clusters = Math.Max(1, (l1Size * 8 + cs - 1) / cs);
        var refBlockEntries = (long)cs * 8 / options.RefcountBits;
        long refTableClusters = 1, refBlocks = 1;
        while (true)
        {
            var total = 1 + refTableClusters + refBlocks + l1Clusters;
            var neededBlocks = (total + refBlockEntries - 1) / refBlockEntries;
            var tableClusters = Math.Max(1, (neededBlocks * 8 + cs - 1) / cs);
            if (neededBlocks == refBlocks && tableClusters == refTableClusters)
            {
                break;
            }
            refBlocks = neededBlocks;
            refTableClusters = tableClusters;
        }
        var refTableOffset = (long)cs;
        var refBlocksOffset = refTableOffset + refTableClusters * cs;
        var l1Offset = refBlocksOffset + refBlocks * cs;
        var metadataClusters = 1 + refTableClusters + refBlocks + l1Clusters;

        var extensions = new List<Qcow2HeaderExtension>();
        if (options.BackingFormat is not null)
        {
            extensions.Add(Qcow2HeaderExtension.FromString(Qcow2HeaderExtension.BackingFormat, options.BackingFormat));
        }
        if (options.DataFile is not null)
        {
            extensions.Add(Qcow2HeaderExtension.FromString(Qcow2HeaderExtension.ExternalDataFile, options.DataFile.Filename));
        }
        // qemu-img (7.2) leaves the feature name table out of images with clusters of 4 KiB and less;
        // we do the same so that our images are byte-identical to theirs.
        if (v3 && cs > 4096)
        {
            extensions.Add(new Qcow2HeaderExtension(Qcow2HeaderExtension.FeatureNameTable,
                Qcow2FeatureNameEntry.WriteTable(Qcow2FeatureNameEntry.Standard)));
        }
        var headerCluster = new Qcow2HeaderCluster
        {
            Header = new Qcow2Header
            {
                Version = v3 ? 3u : 2u,
                ClusterBits = clusterBits,
                Size = (ulong)options.Size,
                L1Size = (uint)l1Size,
                L1TableOffset = (ulong)l1Offset,
                RefcountTableOffset = (ulong)refTableOffset,
                RefcountTableClusters = (uint)refTableClusters,
                CompatibleFeatures = options.LazyRefcounts ? Qcow2Header.CompatLazyRefcounts : 0,
                IncompatibleFeatures = options.DataFile is not null ? Qcow2Header.IncompatDataFile : 0,
                AutoclearFeatures = options.DataFileRaw ? Qcow2Header.AutoclearDataFileRaw : 0,
                RefcountOrder = refcountOrder,
                HeaderLength = v3 ? Qcow2Header.V3HeaderLength : Qcow2Header.V2HeaderLength,
                ExtraFields = v3 ? new byte[Qcow2Header.V3HeaderLength - 105] : [],
            },
            Extensions = extensions,
            BackingFileName = options.BackingFile,
        };

        await file.TruncateAsync(0, cancellationToken).ConfigureAwait(false);

        // Metadata first, the header last: until the header is there the file is not a qcow2 image.
        var refTable = new byte[refTableClusters * cs];
        for (var i = 0; i < refBlocks; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(refTable.AsSpan(i * 8), (ulong)(refBlocksOffset + i * cs));
        }
        await file.WriteAsync(refTableOffset, refTable, WriteFlags.None, cancellationToken).ConfigureAwait(false);
        var blocks = new byte[refBlocks * cs];
        for (var c = 0; c < metadataClusters; c++)
        {
            SetRefcountOne(blocks, c, refcountOrder);
        }
        await file.WriteAsync(refBlocksOffset, blocks, WriteFlags.None, cancellationToken).ConfigureAwait(false);
        // Like qemu-img, the file ends right after the L1 entries.
        await file.WriteAsync(l1Offset, new byte[Math.Max(8, l1Size * 8)], WriteFlags.None, cancellationToken).ConfigureAwait(false);
        var headerBytes = new byte[headerCluster.Size];
        headerCluster.WriteTo(headerBytes);
        await file.WriteAsync(0, headerBytes, WriteFlags.None, cancellationToken).ConfigureAwait(false);
        await file.FlushAsync(cancellationToken).ConfigureAwait(false);

        if (options.DataFile is { } dataFile && dataFile.Length < options.Size)
        {
            // Grown, never shrunk: an existing raw disk keeps its data (a metadata image for its persistent bitmaps).
            await dataFile.TruncateAsync(options.Size, cancellationToken).ConfigureAwait(false);
        }
        if (options.Preallocation == Qcow2Preallocation.Metadata)
        {
            await PreallocateMetadataAsync(file, options.DataFile, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// QEMU's checks of BlockdevCreateOptionsQcow2, in its order (so that the first error reported is
    /// the same). <paramref name="hasDataFile"/>: a data file was asked for (it may not be resolved yet).
    /// </summary>
    public static void Validate(Qcow2CreateOptions o, bool hasDataFile)
    {
        ArgumentNullException.ThrowIfNull(o);
        if (o.Size % 512 != 0)
        {
            throw new BlockException("Image size must be a multiple of 512 bytes");
        }
        var cs = o.ClusterSize;
        if (cs < 512 || cs > 2 << 20 || (cs & (cs - 1)) != 0)
        {
            throw new BlockException("Cluster size must be a power of two between 512 and 2048k");
        }
        if (o.BackingFile is not null && o.Preallocation != Qcow2Preallocation.Off)
        {
            throw new BlockException("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        if (o.BackingFormat is not null && o.BackingFile is null)
        {
            throw new BlockException("Backing format cannot be used without backing file");
        }
        if (o.Version == Qcow2Version.V2 && o.LazyRefcounts)
        {
            throw new BlockException("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if (o.RefcountBits is not (1 or 2 or 4 or 8 or 16 or 32 or 64))
        {
            throw new BlockException("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if (o.Version == Qcow2Version.V2 && o.RefcountBits != 16)
        {
            throw new BlockException("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
        }
        if (hasDataFile && o.Version == Qcow2Version.V2)
        {
            throw new BlockException("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if (o.DataFileRaw && !hasDataFile)
        {
            throw new BlockException("data-file-raw requires data-file");
        }
        if (o.DataFileRaw && o.BackingFile is not null)
        {
            throw new BlockException("Backing file and data-file-raw cannot be used at the same time");
        }
        if (o.BackingFile is not null && System.Text.Encoding.UTF8.GetByteCount(o.BackingFile) > Qcow2HeaderCluster.MaxBackingFileNameLength)
        {
            throw new BlockException("Backing file name too long");
        }
    }

    private static void SetRefcountOne(byte[] blocks, long cluster, int order)
    {
        var bits = 1 << order;
        var bit = cluster * bits;
        if (bits < 8)
        {
            blocks[bit >> 3] |= (byte)(1 << (int)(bit & 7));
        }
        else
        {
            // Big-endian: the least significant byte is the last one of the entry.
            blocks[(bit >> 3) + bits / 8 - 1] = 1;
        }
    }

    /// <summary>preallocation=metadata: every guest cluster gets an L2 entry and a host cluster; the file is grown to cover them.</summary>
    private static async Task PreallocateMetadataAsync(BlockNode file, BlockNode? dataFile, CancellationToken cancellationToken)
    {
        var context = new NodeContext
        {
            NodeName = "qcow2-create",
            IsImplicitName = true,
            Graph = new BlockGraph([]),
            Options = new BlockOptions(),
        };
        var headerCluster = await Qcow2Driver.ReadHeaderClusterAsync(file, cancellationToken).ConfigureAwait(false);
        var sizes = new Qcow2CacheSizes(4L * headerCluster.Header.ClusterSize, 4L * headerCluster.Header.ClusterSize);
        var node = await Qcow2Node.OpenAsync(context, file, null, dataFile, headerCluster, sizes, cancellationToken).ConfigureAwait(false);
        try
        {
            await node.PreallocateAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            await node.CloseAsync().ConfigureAwait(false);
        }
    }
}
