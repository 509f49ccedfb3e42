namespace Backup.Block.Permissions;

/// <summary>
/// How a parent uses a child edge, which decides what it takes and shares there (QEMU's BdrvChildRole
/// and the driver's bdrv_child_perm). One place maps (parent driver, role) to a kind, so the graph can
/// take a child's permissions while the parent is still opening.
/// </summary>
public enum ChildKind
{
    /// <summary>A filter's child: the parent's permissions pass through (blkdebug's image).</summary>
    Filtered,
    /// <summary>raw's file: filtered, but write and resize only as far as the raw node's users need them.</summary>
    RawFile,
    /// <summary>A format's file holding metadata and data (qcow2's file): consistent, unshared write and resize.</summary>
    Storage,
    /// <summary>A file holding only guest data (qcow2's data-file).</summary>
    Data,
    /// <summary>A backing file: read only; shares write only if the parent can stand changing data.</summary>
    Cow,
    /// <summary>copy-before-write's file: read; resize not shared.</summary>
    CopyBeforeWriteSource,
    /// <summary>copy-before-write's target: written by the filter, everything shared.</summary>
    CopyBeforeWriteTarget,
    /// <summary>snapshot-access's file: reads the filter's snapshot view, takes nothing, shares everything.</summary>
    SnapshotView,
}

public static class ChildKinds
{
    /// <summary>The kind of the edge <paramref name="role"/> of a <paramref name="parentDriver"/> node.</summary>
    public static ChildKind Of(string? parentDriver, string role) => role switch
    {
        "backing" => ChildKind.Cow,
        "data-file" => ChildKind.Data,
        "target" => ChildKind.CopyBeforeWriteTarget,
        "file" => parentDriver switch
        {
            "raw" => ChildKind.RawFile,
            "copy-before-write" => ChildKind.CopyBeforeWriteSource,
            "snapshot-access" => ChildKind.SnapshotView,
            "qcow2" => ChildKind.Storage,
            _ => ChildKind.Filtered,
        },
        _ => ChildKind.Filtered,
    };
}
