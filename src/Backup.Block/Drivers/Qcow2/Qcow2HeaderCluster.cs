using System.Text;

namespace Backup.Block.Drivers.Qcow2;

/// <summary>
/// Everything qcow2 keeps in its first cluster: the header, the header extensions and the backing file
/// name stored after them (qcow2.txt "Header extensions": the name lives between the end of the
/// extension area and the end of the first cluster). Rewriting the header writes all three back, with
/// the extensions we do not interpret (bitmaps, unknown types) byte for byte as we found them.
/// </summary>
internal sealed record Qcow2HeaderCluster
{
    /// <summary>The spec's limit on the backing file name.</summary>
    public const int MaxBackingFileNameLength = 1023;

    public required Qcow2Header Header { get; init; }

    /// <summary>The extensions in on-disk order, including the ones we interpret.</summary>
    public required IReadOnlyList<Qcow2HeaderExtension> Extensions { get; init; }

    public string? BackingFileName { get; init; }

    public string? BackingFormat =>
        Extensions.FirstOrDefault(e => e.Type == Qcow2HeaderExtension.BackingFormat) is { Data: not null } ext
            ? ext.DataAsString() : null;

    /// <summary>The external data file's name (extension 0x44415441), as stored: QEMU opens it as given, relative to its working directory.</summary>
    public string? DataFileName =>
        Extensions.FirstOrDefault(e => e.Type == Qcow2HeaderExtension.ExternalDataFile) is { Data: not null } ext
            ? ext.DataAsString() : null;

    public IReadOnlyList<Qcow2FeatureNameEntry> FeatureNames =>
        Extensions.FirstOrDefault(e => e.Type == Qcow2HeaderExtension.FeatureNameTable) is { Data: not null } ext
            ? Qcow2FeatureNameEntry.ReadTable(ext.Data) : [];

    /// <summary>Parses cluster 0 (at least the header's cluster size worth of bytes, or the whole file if shorter).</summary>
    public static bool TryRead(ReadOnlySpan<byte> cluster, out Qcow2HeaderCluster? result, out string? error)
    {
        result = null;
        if (!Qcow2Header.TryRead(cluster, out var header, out error))
        {
            return false;
        }
        var end = Math.Min(cluster.Length, header.ClusterSize);
        // Extensions run from the end of the header to the backing file name (or the end of the cluster).
        var extEnd = end;
        if (header.BackingFileOffset != 0)
        {
            if (header.BackingFileSize > MaxBackingFileNameLength ||
                header.BackingFileOffset + header.BackingFileSize > (ulong)end)
            {
                error = "Backing file name too long";
                return false;
            }
            extEnd = (int)Math.Max((long)header.HeaderLength, (long)header.BackingFileOffset);
        }
        if (!Qcow2HeaderExtension.TryReadAll(cluster[header.HeaderLength..extEnd], out var extensions, out error))
        {
            return false;
        }
        string? backing = null;
        if (header.BackingFileOffset != 0)
        {
            backing = Encoding.UTF8.GetString(cluster.Slice((int)header.BackingFileOffset, (int)header.BackingFileSize));
        }
        result = new Qcow2HeaderCluster { Header = header, Extensions = extensions, BackingFileName = backing };
        return true;
    }

    /// <summary>
    /// Bytes <see cref="WriteTo"/> produces: header, extensions, end marker, then the backing file name.
    /// Fails when that does not fit into one cluster.
    /// </summary>
    public int Size
    {
        get
        {
            var n = Header.HeaderLength + Extensions.Sum(e => e.Size) + 8;
            return n + (BackingFileName is null ? 0 : Encoding.UTF8.GetByteCount(BackingFileName));
        }
    }

    /// <summary>
    /// Serialises the header cluster, fixing up backing_file_offset/size to where the name lands.
    /// Returns the header as written.
    /// </summary>
    public Qcow2Header WriteTo(Span<byte> destination)
    {
        if (Size > Header.ClusterSize)
        {
            throw new BlockException("qcow2: header extensions and backing file name do not fit into the first cluster");
        }
        destination[..Size].Clear();
        var pos = Header.HeaderLength;
        foreach (var ext in Extensions)
        {
            ext.WriteTo(destination[pos..]);
            pos += ext.Size;
        }
        pos += 8; // end-of-extensions marker: eight zero bytes
        var header = Header with { BackingFileOffset = 0, BackingFileSize = 0 };
        if (BackingFileName is not null)
        {
            var name = Encoding.UTF8.GetBytes(BackingFileName);
            name.CopyTo(destination[pos..]);
            header = header with { BackingFileOffset = (ulong)pos, BackingFileSize = (uint)name.Length };
        }
        header.WriteTo(destination);
        return header;
    }
}
