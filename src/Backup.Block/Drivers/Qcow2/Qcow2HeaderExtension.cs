using System.Buffers.Binary;
using System.Text;

namespace Backup.Block.Drivers.Qcow2;

/// <summary>
/// One header extension (qcow2.txt "Header extensions"): type, length, data, padded to 8 bytes. We
/// interpret the backing format and the feature name table; every other extension (bitmaps, unknown
/// ones) is kept as opaque bytes and written back unchanged when the header is rewritten.
/// </summary>
internal readonly record struct Qcow2HeaderExtension(uint Type, byte[] Data)
{
    public const uint EndOfExtensions = 0x00000000;
    public const uint BackingFormat = 0xe2792aca;
    public const uint FeatureNameTable = 0x6803f857;
    public const uint Bitmaps = 0x23852875;
    public const uint FullDiskEncryption = 0x0537be77;
    public const uint ExternalDataFile = 0x44415441;

    /// <summary>Bytes this extension takes on disk: 8 bytes of type and length, then the data padded to 8.</summary>
    public int Size => 8 + Align8(Data.Length);

    public static int Align8(int n) => (n + 7) & ~7;

    /// <summary>
    /// Parses the extension area that starts right after the fixed header and ends with an end marker
    /// (or the end of <paramref name="area"/>, as QEMU tolerates).
    /// </summary>
    public static bool TryReadAll(ReadOnlySpan<byte> area, out List<Qcow2HeaderExtension> extensions, out string? error)
    {
        extensions = [];
        var pos = 0;
        while (pos + 8 <= area.Length)
        {
            var type = BinaryPrimitives.ReadUInt32BigEndian(area[pos..]);
            var length = BinaryPrimitives.ReadUInt32BigEndian(area[(pos + 4)..]);
            if (type == EndOfExtensions)
            {
                break;
            }
            if (length > (uint)(area.Length - pos - 8))
            {
                error = "Invalid header extension length";
                return false;
            }
            extensions.Add(new Qcow2HeaderExtension(type, area.Slice(pos + 8, (int)length).ToArray()));
            pos += 8 + Align8((int)length);
        }
        error = null;
        return true;
    }

    /// <summary>Writes this extension with zero padding.</summary>
    public void WriteTo(Span<byte> destination)
    {
        destination[..Size].Clear();
        BinaryPrimitives.WriteUInt32BigEndian(destination, Type);
        BinaryPrimitives.WriteUInt32BigEndian(destination[4..], (uint)Data.Length);
        Data.CopyTo(destination[8..]);
    }

    public static Qcow2HeaderExtension FromString(uint type, string value) => new(type, Encoding.UTF8.GetBytes(value));

    public string DataAsString() => Encoding.UTF8.GetString(Data);
}

/// <summary>One 48-byte entry of the feature name table extension (qcow2.txt "Feature name table").</summary>
internal readonly record struct Qcow2FeatureNameEntry(byte Type, byte Bit, string Name)
{
    public const int Size = 48;
    public const byte Incompatible = 0;
    public const byte Compatible = 1;
    public const byte Autoclear = 2;

    public static bool TryRead(ReadOnlySpan<byte> source, out Qcow2FeatureNameEntry entry)
    {
        if (source.Length < Size)
        {
            entry = default;
            return false;
        }
        var name = source.Slice(2, 46);
        var end = name.IndexOf((byte)0);
        entry = new Qcow2FeatureNameEntry(source[0], source[1], Encoding.UTF8.GetString(end < 0 ? name : name[..end]));
        return true;
    }

    public void WriteTo(Span<byte> destination)
    {
        destination[..Size].Clear();
        destination[0] = Type;
        destination[1] = Bit;
        var bytes = Encoding.UTF8.GetBytes(Name);
        bytes.AsSpan(0, Math.Min(bytes.Length, 46)).CopyTo(destination[2..]);
    }

    public static List<Qcow2FeatureNameEntry> ReadTable(ReadOnlySpan<byte> data)
    {
        var list = new List<Qcow2FeatureNameEntry>();
        for (var pos = 0; pos + Size <= data.Length; pos += Size)
        {
            if (TryRead(data[pos..], out var e))
            {
                list.Add(e);
            }
        }
        return list;
    }

    /// <summary>The table qemu-img writes into new v3 images: every feature QEMU knows, so older readers can name them.</summary>
    public static IReadOnlyList<Qcow2FeatureNameEntry> Standard { get; } =
    [
        new(Incompatible, 0, "dirty bit"),
        new(Incompatible, 1, "corrupt bit"),
        new(Incompatible, 2, "external data file"),
        new(Incompatible, 3, "compression type"),
        new(Incompatible, 4, "extended L2 entries"),
        new(Compatible, 0, "lazy refcounts"),
        new(Autoclear, 0, "bitmaps"),
        new(Autoclear, 1, "raw external data"),
    ];

    public static byte[] WriteTable(IReadOnlyList<Qcow2FeatureNameEntry> entries)
    {
        var data = new byte[entries.Count * Size];
        for (var i = 0; i < entries.Count; i++)
        {
            entries[i].WriteTo(data.AsSpan(i * Size));
        }
        return data;
    }
}
