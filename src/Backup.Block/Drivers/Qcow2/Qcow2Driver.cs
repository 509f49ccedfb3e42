using System.Buffers.Binary;

namespace Backup.Block.Drivers.Qcow2;

/// <summary>
/// The <c>qcow2</c> format driver. Options follow QEMU's BlockdevOptionsQcow2: <c>file</c> (required),
/// <c>backing</c> (a node name, nested options, or null for none; absent means "the file named in the
/// header"), <c>data-file</c> (the external data file; absent means "the file named in the header"),
/// the cache sizes, and the discard/overlap/lazy-refcount tunables, which are accepted.
/// </summary>
/// <remarks>
/// Cache sizing: by default the L2 cache holds enough tables to map the whole image, capped at
/// 32 MiB (QEMU's default cap), which maps 256 GiB with 64 KiB clusters, 16 GiB with 4 KiB clusters
/// and 8 GiB or more for every cluster size from 2 KiB up; the refcount cache gets a quarter of the L2
/// cache, at least four blocks. <c>cache-size</c>, <c>l2-cache-size</c> and
/// <c>refcount-cache-size</c> (bytes) override this as in QEMU. Whole tables are cached, so
/// <c>l2-cache-entry-size</c> is accepted and ignored.
/// </remarks>
public sealed class Qcow2Driver : IBlockDriver
{
    public const long DefaultMaxL2CacheBytes = 32L << 20;

    /// <summary>Incompatible features we implement: dirty (refused read-write), corrupt (read-only) and external data file.</summary>
    private const ulong SupportedIncompatible = Qcow2Header.IncompatDirty | Qcow2Header.IncompatCorrupt | Qcow2Header.IncompatDataFile;

    public string Name => "qcow2";

    public async ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var options = context.Options;
        var file = (await context.Graph.OpenChildAsync(context, "file", required: true, cancellationToken).ConfigureAwait(false))!;

        var headerCluster = await ReadHeaderClusterAsync(file, cancellationToken).ConfigureAwait(false);
        var h = headerCluster.Header;
        CheckFeatures(context, headerCluster);

        if (options.GetBool("lazy-refcounts") == true && h.Version < 3)
        {
            throw new BlockException("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level");
        }
        var cacheSizes = ParseCacheSizes(options, h);

        BlockNode? backing = null;
        if (options.Contains("backing"))
        {
            if (options["backing"] is BlockOptions nested && nested.GetBool("read-only") is null)
            {
                // Backing nodes are read-only unless the user says otherwise, as in QEMU.
                var copy = new BlockOptions(nested) { ["read-only"] = true };
                backing = await context.Graph.OpenChildAsync(context with { Options = new BlockOptions { ["backing"] = copy } },
                    "backing", required: false, cancellationToken).ConfigureAwait(false);
            }
            else
            {
                backing = await context.Graph.OpenChildAsync(context, "backing", required: false, cancellationToken).ConfigureAwait(false);
            }
        }
        else if (headerCluster.BackingFileName is { } name)
        {
            backing = await OpenImplicitBackingAsync(context, file, name, headerCluster.BackingFormat, cancellationToken).ConfigureAwait(false);
        }
        var dataFile = await OpenDataFileAsync(context, headerCluster, cancellationToken).ConfigureAwait(false);
        return await Qcow2Node.OpenAsync(context, file, backing, dataFile, headerCluster, cacheSizes, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// The external data file: the <c>data-file</c> option, or else the name in the header extension,
    /// opened with the file driver as given (relative names are relative to the working directory, as in
    /// QEMU). Null when the image has none.
    /// </summary>
    private static async ValueTask<BlockNode?> OpenDataFileAsync(NodeContext context, Qcow2HeaderCluster headerCluster,
        CancellationToken cancellationToken)
    {
        var h = headerCluster.Header;
        var hasDataFile = (h.IncompatibleFeatures & Qcow2Header.IncompatDataFile) != 0;
        if (!hasDataFile)
        {
            if (context.Options.Contains("data-file"))
            {
                throw new BlockException("'data-file' can only be set for images with an external data file");
            }
            if ((h.AutoclearFeatures & Qcow2Header.AutoclearDataFileRaw) != 0)
            {
                throw new BlockException("data-file-raw requires a data file");
            }
            return null;
        }
        if (context.Options.Contains("data-file"))
        {
            return await context.Graph.OpenChildAsync(context, "data-file", required: true, cancellationToken).ConfigureAwait(false);
        }
        if (headerCluster.DataFileName is not { Length: > 0 } name)
        {
            throw new BlockException("'data-file' is required for this image");
        }
        var parent = context with
        {
            Options = new BlockOptions { ["data-file"] = new BlockOptions { ["driver"] = "file", ["filename"] = name } },
        };
        return await context.Graph.OpenChildAsync(parent, "data-file", required: true, cancellationToken).ConfigureAwait(false);
    }

    internal static async ValueTask<Qcow2HeaderCluster> ReadHeaderClusterAsync(BlockNode file, CancellationToken cancellationToken)
    {
        // Read the largest possible first cluster (or the file, if smaller); the header tells the real size.
        var length = (int)Math.Min(file.Length, 1 << Qcow2Header.MaxClusterBits);
        var buffer = new byte[Math.Max(length, Qcow2Header.V2HeaderLength)];
        if (length > 0)
        {
            await file.ReadAsync(0, buffer.AsMemory(0, length), cancellationToken).ConfigureAwait(false);
        }
        if (!Qcow2HeaderCluster.TryRead(buffer, out var headerCluster, out var error))
        {
            throw new BlockException(error!);
        }
        return headerCluster!;
    }

    private static void CheckFeatures(NodeContext context, Qcow2HeaderCluster headerCluster)
    {
        var h = headerCluster.Header;
        var unsupported = h.IncompatibleFeatures & ~SupportedIncompatible;
        if (unsupported != 0)
        {
            throw new BlockException("Unsupported qcow2 feature(s): " + DescribeFeatures(headerCluster, unsupported));
        }
        if (h.CryptMethod != 0)
        {
            throw new BlockException($"qcow2: encrypted images (crypt_method {h.CryptMethod}) are not supported");
        }
        if (h.Version >= 3 && h.CompressionType != 0)
        {
            throw new BlockException($"Unsupported qcow2 feature(s): compression type {h.CompressionType}");
        }
        if (context.ReadOnly)
        {
            return;
        }
        if ((h.IncompatibleFeatures & Qcow2Header.IncompatCorrupt) != 0)
        {
            throw new BlockException("qcow2: Image is corrupt; cannot be opened read/write");
        }
        if ((h.IncompatibleFeatures & Qcow2Header.IncompatDirty) != 0)
        {
            throw new BlockException("qcow2: Image is dirty (lazy refcounts were in use when it was last closed); " +
                "repair it with 'qemu-img check -r all' or open it read-only");
        }
    }

    /// <summary>Names for feature bits, from the image's own feature name table, as QEMU reports them.</summary>
    private static string DescribeFeatures(Qcow2HeaderCluster headerCluster, ulong mask)
    {
        var names = headerCluster.FeatureNames;
        var parts = new List<string>();
        for (var bit = 0; bit < 64; bit++)
        {
            if ((mask & (1UL << bit)) == 0)
            {
                continue;
            }
            var known = names.FirstOrDefault(n => n.Type == Qcow2FeatureNameEntry.Incompatible && n.Bit == bit);
            parts.Add(known.Name is { Length: > 0 } name ? name : $"Unknown incompatible feature: {1UL << bit:x}");
        }
        return string.Join(", ", parts);
    }

    private static Qcow2CacheSizes ParseCacheSizes(BlockOptions options, Qcow2Header h)
    {
        var cs = (long)h.ClusterSize;
        var total = options.GetInt64("cache-size");
        var l2 = options.GetInt64("l2-cache-size");
        var rc = options.GetInt64("refcount-cache-size");
        if (total is not null && l2 is not null && rc is not null && total != l2 + rc)
        {
            throw new BlockException("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time");
        }
        var l2Coverage = cs * (cs / 8);
        var fullCoverage = ((long)h.Size + l2Coverage - 1) / l2Coverage * cs;
        var defaultL2 = Math.Clamp(fullCoverage, 4 * cs, Math.Max(DefaultMaxL2CacheBytes, 4 * cs));
        long l2Bytes, rcBytes;
        if (total is { } t)
        {
            l2Bytes = l2 ?? (rc is { } r ? t - r : Math.Min(defaultL2, t * 4 / 5));
            rcBytes = rc ?? t - l2Bytes;
        }
        else
        {
            l2Bytes = l2 ?? defaultL2;
            rcBytes = rc ?? Math.Max(l2Bytes / 4, 4 * cs);
        }
        if (l2Bytes < 0 || rcBytes < 0)
        {
            throw new BlockException("l2-cache-size and refcount-cache-size must not be negative");
        }
        return new Qcow2CacheSizes(Math.Max(l2Bytes, 2 * cs), Math.Max(rcBytes, 2 * cs));
    }

    /// <summary>
    /// Opens the backing file the header names as an implicit, read-only child: the name is relative to
    /// the image's directory (as QEMU resolves it); the format comes from the backing format extension,
    /// or is probed (qcow2 by magic, otherwise raw).
    /// </summary>
    private static async ValueTask<BlockNode> OpenImplicitBackingAsync(NodeContext context, BlockNode file, string name,
        string? format, CancellationToken cancellationToken)
    {
        var path = ResolveBackingPath(file.Filename, name);
        format ??= await ProbeFormatAsync(path).ConfigureAwait(false);
        var nested = new BlockOptions
        {
            ["driver"] = format,
            ["read-only"] = true,
            ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = path },
        };
        var parent = context with { Options = new BlockOptions { ["backing"] = nested } };
        try
        {
            return (await context.Graph.OpenChildAsync(parent, "backing", required: true, cancellationToken).ConfigureAwait(false))!;
        }
        catch (BlockException e)
        {
            throw new BlockException($"Could not open backing file: {e.Message}", e);
        }
    }

    /// <summary>QEMU's path_combine: a relative backing name is taken relative to the directory of the image's file name.</summary>
    public static string ResolveBackingPath(string imageFilename, string backingName)
    {
        ArgumentNullException.ThrowIfNull(imageFilename);
        ArgumentNullException.ThrowIfNull(backingName);
        if (backingName.StartsWith('/') || backingName.Contains("://", StringComparison.Ordinal))
        {
            return backingName;
        }
        var slash = imageFilename.LastIndexOf('/');
        return slash < 0 ? backingName : imageFilename[..(slash + 1)] + backingName;
    }

    private static async ValueTask<string> ProbeFormatAsync(string path)
    {
        try
        {
            await using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete, 1, useAsync: true);
            var magic = new byte[4];
            var n = await stream.ReadAtLeastAsync(magic, 4, throwOnEndOfStream: false).ConfigureAwait(false);
            return n == 4 && BinaryPrimitives.ReadUInt32BigEndian(magic) == Qcow2Header.QcowMagic ? "qcow2" : "raw";
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Let the file driver report the failure in its own words.
            return "raw";
        }
    }
}
