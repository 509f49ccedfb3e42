namespace Backup.Block;

[Flags]
public enum BlockStatusFlags
{
    None = 0,
    /// <summary>Reading the range returns data stored for it (it may still happen to be zeros).</summary>
    Data = 1,
    /// <summary>The range reads as zeros.</summary>
    Zero = 2,
    /// <summary>This node itself (not a backing node) decides what the range reads as.</summary>
    Allocated = 4,
}

/// <summary>The status of the extent that starts at the queried offset and runs for <see cref="Length"/> bytes.</summary>
/// <param name="Depth">Which layer of a backing chain allocates the extent: 1 = this node, 0 = none.</param>
public readonly record struct BlockStatus(long Length, BlockStatusFlags Flags, int Depth = 1)
{
    public bool IsZero => (Flags & BlockStatusFlags.Zero) != 0;
    public bool IsData => (Flags & BlockStatusFlags.Data) != 0;
    public bool IsAllocated => (Flags & BlockStatusFlags.Allocated) != 0;
}

[Flags]
public enum WriteFlags
{
    None = 0,
    /// <summary>Force unit access: the data is on stable storage when the write completes.</summary>
    Fua = 1,
    /// <summary>Write-zeroes may deallocate (punch a hole) instead of writing zeros.</summary>
    MayUnmap = 2,
    /// <summary>Write-zeroes must fail rather than fall back to writing zero buffers.</summary>
    NoFallback = 4,
}

/// <summary>What kind of request changed (or is about to change) the data of a range.</summary>
public enum WriteKind
{
    Write,
    WriteZeroes,
    Discard,
}
