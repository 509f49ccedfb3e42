namespace Backup.Block.Permissions;

/// <summary>
/// One user of a node and what it takes and shares there: a parent node's edge (computed from the
/// parent's own users by <see cref="PermissionRules"/>) or something outside the graph (an export, a
/// job) with fixed masks. The graph keeps each node's uses, newest first, as QEMU keeps bs->parents.
/// </summary>
public abstract class BlockUse
{
    private static long _stamps;

    protected BlockUse(string role)
    {
        Role = role;
        Stamp = Interlocked.Increment(ref _stamps);
    }

    /// <summary>The child name QEMU's messages give the edge ('file', 'backing', 'root' for a device).</summary>
    public string Role { get; }

    /// <summary>When the use was attached; newer uses are checked first, as QEMU does.</summary>
    public long Stamp { get; }

    /// <summary>Who uses the node, as QEMU's messages say it: "node 'd'", "an unnamed block device".</summary>
    public abstract string Description { get; }

    /// <summary>What this use takes and shares, given the committed or proposed state of its parent.</summary>
    internal abstract (BlockPermissions Perm, BlockPermissions Shared) Compute(
        Func<BlockNode, (BlockPermissions Perm, BlockPermissions Shared)> parentState);
}

/// <summary>
/// A parent node's edge to a child. Created while the parent opens (<see cref="Parent"/> still null: the
/// parent has no users yet, so it passes on nothing but its own needs), then bound to the parent.
/// </summary>
public sealed class EdgeUse : BlockUse
{
    internal EdgeUse(string parentName, bool parentWritable, string role, ChildKind kind) : base(role)
    {
        ParentName = parentName;
        ParentWritable = parentWritable;
        Kind = kind;
    }

    public string ParentName { get; }

    public bool ParentWritable { get; }

    public ChildKind Kind { get; }

    /// <summary>The parent once it is open and in the graph.</summary>
    public BlockNode? Parent { get; internal set; }

    public override string Description => $"node '{ParentName}'";

    internal override (BlockPermissions Perm, BlockPermissions Shared) Compute(
        Func<BlockNode, (BlockPermissions Perm, BlockPermissions Shared)> parentState)
    {
        var (perm, shared) = Parent is null ? (BlockPermissions.None, BlockPermissions.All) : parentState(Parent);
        return PermissionRules.ForChild(Kind, ParentWritable, perm, shared);
    }
}

/// <summary>A user outside the graph (QEMU's BlockBackend of an export, a job's node) with fixed masks.</summary>
public sealed class ExternalUse : BlockUse
{
    public ExternalUse(string description, string role, BlockPermissions perm, BlockPermissions shared) : base(role)
    {
        Description = description;
        Perm = perm;
        Shared = shared;
    }

    public override string Description { get; }

    public BlockPermissions Perm { get; internal set; }

    public BlockPermissions Shared { get; internal set; }

    /// <summary>
    /// An NBD export's device: reads, writes if writable, shares everything but resize (QEMU's
    /// blk_exp_add and nbd_export_create).
    /// </summary>
    public static ExternalUse NbdExport(bool writable) => new("an unnamed block device", "root",
        BlockPermissions.ConsistentRead | (writable ? BlockPermissions.Write : BlockPermissions.None),
        BlockPermissions.All & ~BlockPermissions.Resize);

    internal override (BlockPermissions Perm, BlockPermissions Shared) Compute(
        Func<BlockNode, (BlockPermissions Perm, BlockPermissions Shared)> parentState) => (Perm, Shared);
}
