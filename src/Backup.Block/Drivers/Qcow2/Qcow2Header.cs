using System.Buffers.Binary;

namespace Backup.Block.Drivers.Qcow2;

/// <summary>
/// The fixed qcow2 header at offset 0 (qcow2.txt "Header"). Version 2 headers are 72 bytes; version 3
/// headers are <see cref="HeaderLength"/> bytes, of which we understand the first 112 (through
/// compression_type and its padding). Bytes of later additional fields are kept in
/// <see cref="ExtraFields"/> so that rewriting the header preserves them (spec: "preserving its value").
/// </summary>
internal readonly record struct Qcow2Header
{
    public const uint QcowMagic = 0x514649fb; // "QFI\xfb"
    public const int V2HeaderLength = 72;
    public const int V3MinHeaderLength = 104;
    /// <summary>What we write for v3: through compression_type (byte 104) padded to a multiple of 8.</summary>
    public const int V3HeaderLength = 112;

    // incompatible_features bits
    public const ulong IncompatDirty = 1UL << 0;
    public const ulong IncompatCorrupt = 1UL << 1;
    public const ulong IncompatDataFile = 1UL << 2;
    public const ulong IncompatCompression = 1UL << 3;
    public const ulong IncompatExtendedL2 = 1UL << 4;

    // compatible_features bits
    public const ulong CompatLazyRefcounts = 1UL << 0;

    // autoclear_features bits
    public const ulong AutoclearBitmaps = 1UL << 0;
    public const ulong AutoclearDataFileRaw = 1UL << 1;

    public const int MinClusterBits = 9;
    /// <summary>QEMU's implementation limit (2 MiB clusters); we share it so images stay portable.</summary>
    public const int MaxClusterBits = 21;

    public uint Version { get; init; }
    public ulong BackingFileOffset { get; init; }
    public uint BackingFileSize { get; init; }
    public int ClusterBits { get; init; }
    public ulong Size { get; init; }
    public uint CryptMethod { get; init; }
    public uint L1Size { get; init; }
    public ulong L1TableOffset { get; init; }
    public ulong RefcountTableOffset { get; init; }
    public uint RefcountTableClusters { get; init; }
    public uint NbSnapshots { get; init; }
    public ulong SnapshotsOffset { get; init; }
    public ulong IncompatibleFeatures { get; init; }
    public ulong CompatibleFeatures { get; init; }
    public ulong AutoclearFeatures { get; init; }
    public int RefcountOrder { get; init; }
    public int HeaderLength { get; init; }
    public byte CompressionType { get; init; }

    /// <summary>Header bytes from 105 up to <see cref="HeaderLength"/> (padding and fields newer than this code), preserved verbatim.</summary>
    public byte[] ExtraFields { get; init; }

    public int ClusterSize => 1 << ClusterBits;

    /// <summary>
    /// Parses the header. Fails (with a message in QEMU's words where QEMU has one) on a wrong magic,
    /// an unknown version, or fields that make the rest of the image unreadable.
    /// </summary>
    public static bool TryRead(ReadOnlySpan<byte> source, out Qcow2Header header, out string? error)
    {
        header = default;
        if (source.Length < V2HeaderLength || BinaryPrimitives.ReadUInt32BigEndian(source) != QcowMagic)
        {
            error = "Image is not in qcow2 format";
            return false;
        }
        var version = BinaryPrimitives.ReadUInt32BigEndian(source[4..]);
        if (version is not (2 or 3))
        {
            error = $"Unsupported qcow2 version {version}";
            return false;
        }
        var h = new Qcow2Header
        {
            Version = version,
            BackingFileOffset = BinaryPrimitives.ReadUInt64BigEndian(source[8..]),
            BackingFileSize = BinaryPrimitives.ReadUInt32BigEndian(source[16..]),
            ClusterBits = (int)BinaryPrimitives.ReadUInt32BigEndian(source[20..]),
            Size = BinaryPrimitives.ReadUInt64BigEndian(source[24..]),
            CryptMethod = BinaryPrimitives.ReadUInt32BigEndian(source[32..]),
            L1Size = BinaryPrimitives.ReadUInt32BigEndian(source[36..]),
            L1TableOffset = BinaryPrimitives.ReadUInt64BigEndian(source[40..]),
            RefcountTableOffset = BinaryPrimitives.ReadUInt64BigEndian(source[48..]),
            RefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(source[56..]),
            NbSnapshots = BinaryPrimitives.ReadUInt32BigEndian(source[60..]),
            SnapshotsOffset = BinaryPrimitives.ReadUInt64BigEndian(source[64..]),
            RefcountOrder = 4,
            HeaderLength = V2HeaderLength,
            ExtraFields = [],
        };
        if (version >= 3)
        {
            if (source.Length < V3MinHeaderLength)
            {
                error = "qcow2 header exceeds cluster size";
                return false;
            }
            var length = (int)Math.Min(BinaryPrimitives.ReadUInt32BigEndian(source[100..]), int.MaxValue);
            if (length < V3MinHeaderLength || length % 8 != 0)
            {
                error = "qcow2 header too short";
                return false;
            }
            if (length > source.Length)
            {
                error = "qcow2 header exceeds cluster size";
                return false;
            }
            h = h with
            {
                IncompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(source[72..]),
                CompatibleFeatures = BinaryPrimitives.ReadUInt64BigEndian(source[80..]),
                AutoclearFeatures = BinaryPrimitives.ReadUInt64BigEndian(source[88..]),
                RefcountOrder = (int)BinaryPrimitives.ReadUInt32BigEndian(source[96..]),
                HeaderLength = length,
                CompressionType = length > 104 ? source[104] : (byte)0,
                ExtraFields = length > 105 ? source[105..length].ToArray() : [],
            };
        }
        if (h.ClusterBits is < MinClusterBits or > MaxClusterBits)
        {
            error = $"Unsupported cluster size: 2^{h.ClusterBits}";
            return false;
        }
        if (h.HeaderLength > h.ClusterSize)
        {
            error = "qcow2 header exceeds cluster size";
            return false;
        }
        if (h.RefcountOrder > 6)
        {
            error = "Reference count entry width too large; may not exceed 64 bits";
            return false;
        }
        header = h;
        error = null;
        return true;
    }

    /// <summary>Writes the <see cref="HeaderLength"/> bytes of the header.</summary>
    public void WriteTo(Span<byte> destination)
    {
        destination[..HeaderLength].Clear();
        BinaryPrimitives.WriteUInt32BigEndian(destination, QcowMagic);
        BinaryPrimitives.WriteUInt32BigEndian(destination[4..], Version);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], BackingFileOffset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], BackingFileSize);
        BinaryPrimitives.WriteUInt32BigEndian(destination[20..], (uint)ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(destination[24..], Size);
        BinaryPrimitives.WriteUInt32BigEndian(destination[32..], CryptMethod);
        BinaryPrimitives.WriteUInt32BigEndian(destination[36..], L1Size);
        BinaryPrimitives.WriteUInt64BigEndian(destination[40..], L1TableOffset);
        BinaryPrimitives.WriteUInt64BigEndian(destination[48..], RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[56..], RefcountTableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(destination[60..], NbSnapshots);
        BinaryPrimitives.WriteUInt64BigEndian(destination[64..], SnapshotsOffset);
        if (Version >= 3)
        {
            BinaryPrimitives.WriteUInt64BigEndian(destination[72..], IncompatibleFeatures);
            BinaryPrimitives.WriteUInt64BigEndian(destination[80..], CompatibleFeatures);
            BinaryPrimitives.WriteUInt64BigEndian(destination[88..], AutoclearFeatures);
            BinaryPrimitives.WriteUInt32BigEndian(destination[96..], (uint)RefcountOrder);
            BinaryPrimitives.WriteUInt32BigEndian(destination[100..], (uint)HeaderLength);
            if (HeaderLength > 104)
            {
                destination[104] = CompressionType;
                ExtraFields.AsSpan(0, Math.Min(ExtraFields.Length, HeaderLength - 105)).CopyTo(destination[105..]);
            }
        }
    }
}
