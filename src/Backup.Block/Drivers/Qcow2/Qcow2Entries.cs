namespace Backup.Block.Drivers.Qcow2;

/// <summary>An L1 table entry (qcow2.txt "Cluster mapping"): the offset of an L2 table and its COPIED bit.</summary>
internal readonly record struct Qcow2L1Entry(ulong Raw)
{
    public const ulong Copied = 1UL << 63;
    /// <summary>Bits 9-55.</summary>
    public const ulong OffsetMask = 0x00ff_ffff_ffff_fe00UL;

    public long L2Offset => (long)(Raw & OffsetMask);
    public bool IsCopied => (Raw & Copied) != 0;
    public bool IsAllocated => L2Offset != 0;

    public static Qcow2L1Entry For(long l2Offset) => new((ulong)l2Offset | Copied);
}

/// <summary>
/// A standard L2 table entry (qcow2.txt "Cluster mapping"). Bit 62 selects the compressed cluster
/// descriptor, whose field split depends on cluster_bits; bit 0 of a standard descriptor means
/// "reads as zeros" (version 3 only).
/// </summary>
internal readonly record struct Qcow2L2Entry(ulong Raw)
{
    public const ulong Copied = 1UL << 63;
    public const ulong Compressed = 1UL << 62;
    public const ulong ZeroFlag = 1UL << 0;
    /// <summary>Bits 9-55 of a standard descriptor.</summary>
    public const ulong OffsetMask = 0x00ff_ffff_ffff_fe00UL;

    public static readonly Qcow2L2Entry Unallocated = new(0);
    public static readonly Qcow2L2Entry Zero = new(ZeroFlag);

    public bool IsCompressed => (Raw & Compressed) != 0;
    public bool IsCopied => (Raw & Copied) != 0;
    public bool IsZero => !IsCompressed && (Raw & ZeroFlag) != 0;
    public long HostOffset => IsCompressed ? 0 : (long)(Raw & OffsetMask);

    /// <summary>Neither data here nor a zero flag: reads go to the backing file.</summary>
    public bool IsUnallocated => !IsCompressed && !IsZero && HostOffset == 0;

    /// <summary>A standard cluster with data that only this L2 entry references: writable in place.</summary>
    public bool IsWritableInPlace => !IsCompressed && !IsZero && HostOffset != 0 && IsCopied;

    public static Qcow2L2Entry Standard(long hostOffset) => new((ulong)hostOffset | Copied);

    /// <summary>Offset of the compressed data; x = 62 - (cluster_bits - 8) bits wide.</summary>
    public long CompressedOffset(int clusterBits) => (long)(Raw & ((1UL << (62 - (clusterBits - 8))) - 1));

    /// <summary>512-byte sectors the compressed data touches, counting the one the offset falls in.</summary>
    public int CompressedSectors(int clusterBits)
    {
        var x = 62 - (clusterBits - 8);
        return (int)((Raw >> x) & ((1UL << (clusterBits - 8)) - 1)) + 1;
    }

    /// <summary>Bytes the compressed data may occupy: whole 512-byte sectors from the offset's sector, less the head of the first one.</summary>
    public int CompressedLength(int clusterBits)
    {
        return (int)(CompressedSectors(clusterBits) * 512L - (CompressedOffset(clusterBits) & 511));
    }
}

/// <summary>A refcount table entry (qcow2.txt "Host cluster management"): the offset of a refcount block.</summary>
internal readonly record struct Qcow2RefcountTableEntry(ulong Raw)
{
    public const ulong OffsetMask = 0xffff_ffff_ffff_fe00UL;

    public long BlockOffset => (long)(Raw & OffsetMask);
}
