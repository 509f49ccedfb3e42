namespace Backup.Block.Permissions;

/// <summary>
/// What a parent takes and shares on a child edge, from what the parent's own users take and share
/// (QEMU's bdrv_default_perms and its filter / cow / storage cases, plus raw's and copy-before-write's
/// adjustments). Pure arithmetic; the graph calls it for every edge when it refreshes permissions.
/// </summary>
public static class PermissionRules
{
    private const BlockPermissions R = BlockPermissions.ConsistentRead;
    private const BlockPermissions W = BlockPermissions.Write;
    private const BlockPermissions WU = BlockPermissions.WriteUnchanged;
    private const BlockPermissions RS = BlockPermissions.Resize;

    /// <param name="kind">The edge's kind.</param>
    /// <param name="parentWritable">The parent node is open read-write (a format may then write metadata).</param>
    /// <param name="perm">What the parent's users take (cumulative).</param>
    /// <param name="shared">What the parent's users share (intersection).</param>
    public static (BlockPermissions Perm, BlockPermissions Shared) ForChild(ChildKind kind, bool parentWritable,
        BlockPermissions perm, BlockPermissions shared)
    {
        // Every kind starts as a filter would: the parent's permissions pass through.
        perm &= BlockPermissions.All;
        shared &= BlockPermissions.All;
        switch (kind)
        {
            case ChildKind.Filtered:
                return (perm, shared);
            case ChildKind.RawFile:
                // raw_child_perm: write and resize only when raw's own users take them (already so here).
                return (perm, shared);
            case ChildKind.Cow:
                perm &= R;
                shared = ((shared & W) != 0 ? W | RS : BlockPermissions.None) | R | WU;
                return (perm, shared);
            case ChildKind.Storage:
                // Metadata: a writable format may write and grow it even with no guest writes; it must
                // stay consistent, and nobody else may write or resize it.
                if (parentWritable)
                {
                    perm |= W | RS;
                }
                perm |= R;
                shared &= ~(W | RS);
                return Data(perm, shared);
            case ChildKind.Data:
                return Data(perm, shared);
            case ChildKind.CopyBeforeWriteSource:
                // QEMU also unshares write here, since it moves the source's other parents onto the
                // filter. backupd leaves exports on the source and observes its writes instead (see
                // docs/architecture.md), so write stays shared.
                return (perm | R, shared & ~RS);
            case ChildKind.CopyBeforeWriteTarget:
                return (W, BlockPermissions.All);
            case ChildKind.SnapshotView:
                return (BlockPermissions.None, BlockPermissions.All);
            default:
                throw new ArgumentOutOfRangeException(nameof(kind));
        }
    }

    /// <summary>The data part of bdrv_default_perms_for_storage.</summary>
    private static (BlockPermissions, BlockPermissions) Data(BlockPermissions perm, BlockPermissions shared)
    {
        // The format may rely on the size; copy-on-read becomes real writes; writing may grow the file.
        shared &= ~RS;
        if ((perm & WU) != 0)
        {
            perm |= W;
        }
        if ((perm & W) != 0)
        {
            perm |= RS;
        }
        return (perm, shared);
    }
}
