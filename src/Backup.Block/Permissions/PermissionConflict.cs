namespace Backup.Block.Permissions;

/// <summary>Two uses of one node that cannot coexist: one takes what the other does not share.</summary>
public sealed class PermissionConflictException(string message) : BlockException(message)
{
    /// <summary>
    /// QEMU's bdrv_a_allow_b: <paramref name="b"/> takes what <paramref name="a"/> does not share, on
    /// <paramref name="nodeName"/>. The message names b as the one that requires and a as the one that unshares.
    /// </summary>
    public static PermissionConflictException Between(string nodeName, BlockUse a, BlockPermissions aShared,
        BlockUse b, BlockPermissions bPerm)
    {
        ArgumentNullException.ThrowIfNull(a);
        ArgumentNullException.ThrowIfNull(b);
        var perms = (bPerm & ~aShared).Describe();
        return new PermissionConflictException(
            $"Permission conflict on node '{nodeName}': permissions '{perms}' are both required by {b.Description} " +
            $"(uses node '{nodeName}' as '{b.Role}' child) and unshared by {a.Description} " +
            $"(uses node '{nodeName}' as '{a.Role}' child).");
    }
}
