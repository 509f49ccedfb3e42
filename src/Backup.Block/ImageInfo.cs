namespace Backup.Block;

/// <summary>What query-named-block-nodes reports under <c>image</c> (QEMU's ImageInfo).</summary>
public sealed record ImageInfo
{
    public required string Filename { get; init; }
    public required string Format { get; init; }
    public required long VirtualSize { get; init; }
    public long? ActualSize { get; init; }
    /// <summary>Null when the driver reports none (QEMU: no bdrv_get_info, e.g. null-co).</summary>
    public bool? DirtyFlag { get; init; } = false;
    public int? ClusterSize { get; init; }
    public string? BackingFilename { get; init; }
    public string? FullBackingFilename { get; init; }
    public string? BackingFilenameFormat { get; init; }
    public ImageInfo? BackingImage { get; init; }

    /// <summary>Driver-specific facts (<c>format-specific</c>): a type tag and ordered members.</summary>
    public FormatSpecificInfo? FormatSpecific { get; init; }
}

/// <param name="Type">The union tag, e.g. "qcow2".</param>
/// <param name="Data">Members in the order QEMU prints them; values are strings, numbers, booleans or nested lists of these.</param>
public sealed record FormatSpecificInfo(string Type, IReadOnlyList<KeyValuePair<string, object?>> Data);

/// <summary>Everything the graph passes a driver when it opens a node.</summary>
public sealed record NodeContext
{
    public required string NodeName { get; init; }
    public bool IsImplicitName { get; init; }
    public bool ReadOnly { get; init; }

    /// <summary>force-share: the node's parents share every permission on it (read-only nodes only).</summary>
    public bool ForceShare { get; init; }
    public bool CacheDirect { get; init; }
    public bool CacheNoFlush { get; init; }
    public DiscardMode Discard { get; init; }
    public DetectZeroesMode DetectZeroes { get; init; }
    public required BlockGraph Graph { get; init; }
    public required BlockOptions Options { get; init; }
}
