using System.Buffers.Binary;
using System.Text;

namespace Backup.Block.Drivers.Qcow2;

/// <summary>
/// The data of the bitmaps header extension (qcow2.txt "Bitmaps extension", type 0x23852875): how many
/// bitmaps the image stores and where their directory is. Only trusted when autoclear bit 0 is set.
/// </summary>
internal readonly record struct Qcow2BitmapsExtension(uint NbBitmaps, ulong DirectorySize, ulong DirectoryOffset)
{
    /// <summary>nb_bitmaps, reserved (4 bytes), bitmap_directory_size, bitmap_directory_offset.</summary>
    public const int Size = 24;

    /// <summary>QEMU's QCOW2_MAX_BITMAPS: the most bitmaps an image may hold.</summary>
    public const int MaxBitmaps = 65535;

    /// <summary>QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE: 1 KiB a bitmap on average.</summary>
    public const long MaxDirectorySize = 1024L * MaxBitmaps;

    /// <summary>Parses and checks the extension data (QEMU's wording, which prefixes "bitmaps_ext: ").</summary>
    public static bool TryRead(ReadOnlySpan<byte> data, int clusterSize, out Qcow2BitmapsExtension extension, out string? error)
    {
        extension = default;
        if (data.Length != Size)
        {
            error = "bitmaps_ext: Invalid extension length";
            return false;
        }
        if (BinaryPrimitives.ReadUInt32BigEndian(data[4..]) != 0)
        {
            error = "bitmaps_ext: Reserved field is not zero";
            return false;
        }
        var ext = new Qcow2BitmapsExtension(
            BinaryPrimitives.ReadUInt32BigEndian(data),
            BinaryPrimitives.ReadUInt64BigEndian(data[8..]),
            BinaryPrimitives.ReadUInt64BigEndian(data[16..]));
        if (ext.NbBitmaps > MaxBitmaps)
        {
            error = $"bitmaps_ext: Image has {ext.NbBitmaps} bitmaps, exceeding the QEMU supported maximum of {MaxBitmaps}";
            return false;
        }
        if (ext.NbBitmaps == 0)
        {
            error = "bitmaps_ext: found bitmaps extension with zero bitmaps";
            return false;
        }
        if (ext.DirectoryOffset % (ulong)clusterSize != 0 || ext.DirectoryOffset == 0)
        {
            error = "bitmaps_ext: invalid dir offset";
            return false;
        }
        if (ext.DirectorySize > MaxDirectorySize)
        {
            error = $"bitmaps_ext: bitmap directory size ({ext.DirectorySize}) exceeds the maximum supported size ({MaxDirectorySize})";
            return false;
        }
        extension = ext;
        error = null;
        return true;
    }

    public void WriteTo(Span<byte> destination)
    {
        destination[..Size].Clear();
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbBitmaps);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], DirectorySize);
        BinaryPrimitives.WriteUInt64BigEndian(destination[16..], DirectoryOffset);
    }

    public byte[] ToArray()
    {
        var data = new byte[Size];
        WriteTo(data);
        return data;
    }
}

/// <summary>
/// One entry of the bitmap directory (qcow2.txt "Bitmap directory"): where the bitmap table is, its
/// flags, granularity and name. Entries are 24 bytes, extra data, the name (no terminator), padded to 8.
/// </summary>
internal sealed record Qcow2BitmapDirectoryEntry
{
    public const int FixedSize = 24;

    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    public const uint FlagInUse = 1u << 0;
    public const uint FlagAuto = 1u << 1;
    public const uint FlagExtraDataCompatible = 1u << 2;
    private const uint KnownFlags = FlagInUse | FlagAuto | FlagExtraDataCompatible;

    /// <summary>The only type the spec defines: a dirty tracking bitmap.</summary>
    public const byte TypeDirtyTracking = 1;

    /// <summary>QEMU's BME_* limits, which it checks on load and before creating a persistent bitmap.</summary>
    public const int MinGranularityBits = 9;
    public const int MaxGranularityBits = 31;
    public const int MaxNameSize = 1023;
    public const long MaxTableSize = 0x8000000;
    public const long MaxPhysSize = 0x20000000;

    public required ulong TableOffset { get; init; }
    public required uint TableSize { get; init; }
    public required uint Flags { get; init; }
    public byte Type { get; init; } = TypeDirtyTracking;
    public required int GranularityBits { get; init; }
    public required string Name { get; init; }

    /// <summary>Kept verbatim; only allowed with the extra_data_compatible flag.</summary>
    public byte[] ExtraData { get; init; } = [];

    public bool InUse => (Flags & FlagInUse) != 0;

    public bool Auto => (Flags & FlagAuto) != 0;

    public long Granularity => 1L << GranularityBits;

    public int Size => Qcow2HeaderExtension.Align8(FixedSize + ExtraData.Length + Encoding.UTF8.GetByteCount(Name));

    /// <summary>The directory space one entry with a name of <paramref name="nameBytes"/> bytes and no extra data takes.</summary>
    public static int SizeFor(int nameBytes) => Qcow2HeaderExtension.Align8(FixedSize + nameBytes);

    /// <summary>
    /// Parses one entry at the start of <paramref name="source"/>; <paramref name="consumed"/> is its
    /// padded size. Fails on truncation only; <see cref="Validate"/> checks the values.
    /// </summary>
    public static bool TryRead(ReadOnlySpan<byte> source, out Qcow2BitmapDirectoryEntry? entry, out int consumed)
    {
        entry = null;
        consumed = 0;
        if (source.Length < FixedSize)
        {
            return false;
        }
        var nameSize = BinaryPrimitives.ReadUInt16BigEndian(source[18..]);
        var extraSize = BinaryPrimitives.ReadUInt32BigEndian(source[20..]);
        var size = (long)FixedSize + extraSize + nameSize;
        if (size > source.Length)
        {
            return false;
        }
        string name;
        try
        {
            // Strict: a name must survive the round trip, the in-place rewrite relies on entry sizes staying put.
            name = StrictUtf8.GetString(source.Slice(FixedSize + (int)extraSize, nameSize));
        }
        catch (DecoderFallbackException)
        {
            return false;
        }
        entry = new Qcow2BitmapDirectoryEntry
        {
            TableOffset = BinaryPrimitives.ReadUInt64BigEndian(source),
            TableSize = BinaryPrimitives.ReadUInt32BigEndian(source[8..]),
            Flags = BinaryPrimitives.ReadUInt32BigEndian(source[12..]),
            Type = source[16],
            GranularityBits = source[17],
            ExtraData = source.Slice(FixedSize, (int)extraSize).ToArray(),
            Name = name,
        };
        consumed = (int)Math.Min(Qcow2HeaderExtension.Align8((int)size), source.Length);
        return true;
    }

    public void WriteTo(Span<byte> destination)
    {
        var name = Encoding.UTF8.GetBytes(Name);
        destination[..Size].Clear();
        BinaryPrimitives.WriteUInt64BigEndian(destination, TableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], TableSize);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], Flags);
        destination[16] = Type;
        destination[17] = (byte)GranularityBits;
        BinaryPrimitives.WriteUInt16BigEndian(destination[18..], (ushort)name.Length);
        BinaryPrimitives.WriteUInt32BigEndian(destination[20..], (uint)ExtraData.Length);
        ExtraData.CopyTo(destination[FixedSize..]);
        name.CopyTo(destination[(FixedSize + ExtraData.Length)..]);
    }

    /// <summary>
    /// Entries of a bitmap table that covers <paramref name="diskSize"/> bytes at
    /// <paramref name="granularity"/>: one bit per granule, <paramref name="clusterSize"/> × 8 bits a cluster.
    /// </summary>
    public static long TableSizeFor(long diskSize, long granularity, int clusterSize)
    {
        var bits = (diskSize + granularity - 1) / granularity;
        var bitsPerCluster = (long)clusterSize * 8;
        return (bits + bitsPerCluster - 1) / bitsPerCluster;
    }

    /// <summary>
    /// QEMU's check_constraints_on_bitmap: granularity in range, bitmap not too large, name not too long.
    /// Returns the reason, or null when the bitmap can be stored.
    /// </summary>
    public static string? CheckConstraints(int nameBytes, long granularity, long diskSize, int clusterSize)
    {
        var bits = System.Numerics.BitOperations.TrailingZeroCount((ulong)granularity);
        if (bits > MaxGranularityBits)
        {
            return $"Granularity exceeds maximum ({1L << MaxGranularityBits} bytes)";
        }
        if (bits < MinGranularityBits)
        {
            return $"Granularity is under minimum ({1L << MinGranularityBits} bytes)";
        }
        // QEMU keeps at most 512 MiB of bits (in 64-bit words) in memory per bitmap: 2 TiB at 512 B.
        var granules = (diskSize + granularity - 1) / granularity;
        if (TableSizeFor(diskSize, granularity, clusterSize) > MaxTableSize || (granules + 63) / 64 * 8 > MaxPhysSize)
        {
            return "Too much space will be occupied by the bitmap. Use larger granularity";
        }
        if (nameBytes > MaxNameSize)
        {
            return $"Name length exceeds maximum ({MaxNameSize} characters)";
        }
        return null;
    }

    /// <summary>
    /// QEMU's check_dir_entry: the values make a bitmap we can load (or at least keep) for a disk of
    /// <paramref name="diskSize"/>. Returns the reason it cannot, or null.
    /// </summary>
    public string? Validate(long diskSize, int clusterSize, long fileLength)
    {
        if (Type != TypeDirtyTracking)
        {
            return "unknown bitmap type";
        }
        if ((Flags & ~KnownFlags) != 0)
        {
            return "reserved flags set";
        }
        if (GranularityBits is < MinGranularityBits or > MaxGranularityBits)
        {
            return "invalid granularity";
        }
        if (Encoding.UTF8.GetByteCount(Name) is 0 or > MaxNameSize)
        {
            return "invalid name";
        }
        if (ExtraData.Length != 0 && (Flags & FlagExtraDataCompatible) == 0)
        {
            return "unsupported extra data";
        }
        if (TableSize != TableSizeFor(diskSize, Granularity, clusterSize) || TableSize > MaxTableSize)
        {
            return "wrong bitmap table size";
        }
        if (TableOffset == 0 || TableOffset % (ulong)clusterSize != 0 ||
            TableOffset + (ulong)TableSize * 8 > (ulong)Math.Max(fileLength, 0))
        {
            return "invalid bitmap table offset";
        }
        return null;
    }
}

/// <summary>The whole bitmap directory: entries in on-disk order.</summary>
internal static class Qcow2BitmapDirectory
{
    /// <summary>
    /// Parses <paramref name="count"/> entries that must fill <paramref name="data"/> exactly, checks each
    /// (<see cref="Qcow2BitmapDirectoryEntry.Validate"/>) and that names are unique. Errors in QEMU's words.
    /// </summary>
    public static bool TryRead(ReadOnlySpan<byte> data, uint count, long diskSize, int clusterSize, long fileLength,
        out List<Qcow2BitmapDirectoryEntry> entries, out string? error)
    {
        entries = [];
        var pos = 0;
        var names = new HashSet<string>(StringComparer.Ordinal);
        for (var i = 0u; i < count; i++)
        {
            if (!Qcow2BitmapDirectoryEntry.TryRead(data[pos..], out var entry, out var consumed))
            {
                error = "Broken bitmap directory";
                return false;
            }
            if (entry!.Validate(diskSize, clusterSize, fileLength) is not null)
            {
                error = $"Bitmap '{entry.Name}' doesn't satisfy the constraints";
                return false;
            }
            if (!names.Add(entry.Name))
            {
                error = $"Bitmap '{entry.Name}' is stored twice in the bitmap directory";
                return false;
            }
            entries.Add(entry);
            pos += consumed;
        }
        if (pos != data.Length)
        {
            error = "Broken bitmap directory";
            return false;
        }
        error = null;
        return true;
    }

    public static int SizeOf(IReadOnlyList<Qcow2BitmapDirectoryEntry> entries) => entries.Sum(e => e.Size);

    public static byte[] Write(IReadOnlyList<Qcow2BitmapDirectoryEntry> entries)
    {
        var data = new byte[SizeOf(entries)];
        var pos = 0;
        foreach (var e in entries)
        {
            e.WriteTo(data.AsSpan(pos));
            pos += e.Size;
        }
        return data;
    }
}

/// <summary>
/// One bitmap table entry (qcow2.txt "Bitmap table"): the offset of a data cluster, or 0 for a cluster
/// of zeros; with offset 0, bit 0 set means a cluster of ones.
/// </summary>
internal readonly record struct Qcow2BitmapTableEntry(ulong Raw)
{
    public const ulong OffsetMask = 0x00ff_ffff_ffff_fe00UL;
    public const ulong AllOnes = 1;
    private const ulong ReservedMask = ~OffsetMask & ~AllOnes;

    public long Offset => (long)(Raw & OffsetMask);

    public bool IsAllZeros => Offset == 0 && (Raw & AllOnes) == 0;

    public bool IsAllOnes => Offset == 0 && (Raw & AllOnes) != 0;

    /// <summary>Reserved bits clear, the all-ones bit only without an offset, the offset cluster-aligned.</summary>
    public bool IsValid(int clusterSize) =>
        (Raw & ReservedMask) == 0 && !(Offset != 0 && (Raw & AllOnes) != 0) && Offset % clusterSize == 0;
}
