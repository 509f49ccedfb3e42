namespace Backup.Block.Permissions;

/// <summary>
/// What a user of a node may do with it (QEMU's BLK_PERM_*). A use holds <c>perm</c> (what it does) and
/// <c>shared</c> (what it lets every other user do). QEMU 7.2 has these four: graph-mod ("change
/// children") was dropped in 6.2, so its lock bytes 104 and 204 are never taken by 7.2 either.
/// The bit numbers are the on-disk lock byte offsets' low part (100 + bit, 200 + bit).
/// </summary>
[Flags]
public enum BlockPermissions
{
    None = 0,
    /// <summary>Reads return the node's real data (not required by e.g. a job that only watches the node).</summary>
    ConsistentRead = 1 << 0,
    /// <summary>Writes that change what readers see.</summary>
    Write = 1 << 1,
    /// <summary>Writes that leave the visible data unchanged (copy-on-read).</summary>
    WriteUnchanged = 1 << 2,
    /// <summary>Changing the node's size.</summary>
    Resize = 1 << 3,
    All = ConsistentRead | Write | WriteUnchanged | Resize,
}

public static class BlockPermissionNames
{
    /// <summary>The number of permissions, and so of lock bytes in each range.</summary>
    public const int Count = 4;

    /// <summary>QEMU's bdrv_perm_names: the names of the set permissions, in bit order, joined by ", ".</summary>
    public static string Describe(this BlockPermissions permissions)
    {
        var names = new List<string>(Count);
        for (var bit = 0; bit < Count; bit++)
        {
            var p = (BlockPermissions)(1 << bit);
            if ((permissions & p) != 0)
            {
                names.Add(NameOf(p));
            }
        }
        return string.Join(", ", names);
    }

    private static string NameOf(BlockPermissions single) => single switch
    {
        BlockPermissions.ConsistentRead => "consistent read",
        BlockPermissions.Write => "write",
        BlockPermissions.WriteUnchanged => "write unchanged",
        BlockPermissions.Resize => "resize",
        _ => throw new ArgumentOutOfRangeException(nameof(single)),
    };
}
