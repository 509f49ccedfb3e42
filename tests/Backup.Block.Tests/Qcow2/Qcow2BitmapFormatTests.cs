using System.Buffers.Binary;
using Backup.Block.Drivers.Qcow2;

namespace Backup.Block.Tests.Qcow2;

/// <summary>The bitmaps extension structures (qcow2.txt "Bitmaps extension"): round trips and rejection of bad input.</summary>
public sealed class Qcow2BitmapFormatTests
{
    private const int Cluster = 65536;
    private const long Disk = 64L << 20;

    private static Qcow2BitmapDirectoryEntry Entry(string name, uint flags = Qcow2BitmapDirectoryEntry.FlagAuto, int bits = 16,
        ulong tableOffset = 3 * Cluster, uint? tableSize = null, byte[]? extra = null) => new()
        {
            TableOffset = tableOffset,
            TableSize = tableSize ?? (uint)Qcow2BitmapDirectoryEntry.TableSizeFor(Disk, 1L << bits, Cluster),
            Flags = flags,
            GranularityBits = bits,
            Name = name,
            ExtraData = extra ?? [],
        };

    [Fact]
    public void Extension_round_trips_and_is_24_bytes()
    {
        var ext = new Qcow2BitmapsExtension(3, 120, 5 * Cluster);
        var bytes = ext.ToArray();
        bytes.Should().HaveCount(24);
        BinaryPrimitives.ReadUInt32BigEndian(bytes).Should().Be(3);
        BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(16)).Should().Be(5 * Cluster);
        Qcow2BitmapsExtension.TryRead(bytes, Cluster, out var back, out var error).Should().BeTrue(error);
        back.Should().Be(ext);
    }

    [Theory]
    [InlineData(20, 1u, 0u, 65536ul, 24ul, "bitmaps_ext: Invalid extension length")]
    [InlineData(24, 1u, 7u, 65536ul, 24ul, "bitmaps_ext: Reserved field is not zero")]
    [InlineData(24, 0u, 0u, 65536ul, 24ul, "bitmaps_ext: found bitmaps extension with zero bitmaps")]
    [InlineData(24, 65536u, 0u, 65536ul, 24ul, "bitmaps_ext: Image has 65536 bitmaps, exceeding the QEMU supported maximum of 65535")]
    [InlineData(24, 1u, 0u, 1000ul, 24ul, "bitmaps_ext: invalid dir offset")]
    [InlineData(24, 1u, 0u, 0ul, 24ul, "bitmaps_ext: invalid dir offset")]
    [InlineData(24, 1u, 0u, 65536ul, 1ul << 40, "bitmaps_ext: bitmap directory size (1099511627776) exceeds the maximum supported size (67107840)")]
    public void Bad_extensions_are_rejected_with_qemu_texts(int length, uint count, uint reserved, ulong offset, ulong size, string expected)
    {
        var bytes = new byte[length];
        BinaryPrimitives.WriteUInt32BigEndian(bytes, count);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(4), reserved);
        if (length >= 24)
        {
            BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(8), size);
            BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(16), offset);
        }
        Qcow2BitmapsExtension.TryRead(bytes, Cluster, out _, out var error).Should().BeFalse();
        error.Should().Be(expected);
    }

    [Fact]
    public void Directory_round_trips_with_padding_extra_data_and_utf8_names()
    {
        var entries = new List<Qcow2BitmapDirectoryEntry>
        {
            Entry("pa"),
            Entry("dïsk-ünïcode", flags: Qcow2BitmapDirectoryEntry.FlagInUse, bits: 12),
            Entry(new string('n', 1023), flags: Qcow2BitmapDirectoryEntry.FlagExtraDataCompatible | Qcow2BitmapDirectoryEntry.FlagAuto,
                extra: [1, 2, 3]),
        };
        var bytes = Qcow2BitmapDirectory.Write(entries);
        bytes.Length.Should().Be(entries.Sum(e => e.Size));
        (bytes.Length % 8).Should().Be(0);
        // First entry: 24 fixed bytes + "pa", padded to 32.
        entries[0].Size.Should().Be(32);
        BinaryPrimitives.ReadUInt16BigEndian(bytes.AsSpan(18)).Should().Be(2);
        bytes[16].Should().Be(1, "type 1 is a dirty tracking bitmap");
        bytes[17].Should().Be(16);

        Qcow2BitmapDirectory.TryRead(bytes, 3, Disk, Cluster, 1L << 30, out var back, out var error).Should().BeTrue(error);
        back.Should().HaveCount(3);
        for (var i = 0; i < 3; i++)
        {
            back[i].Should().BeEquivalentTo(entries[i]);
        }
        back[1].InUse.Should().BeTrue();
        back[0].Auto.Should().BeTrue();
        Qcow2BitmapDirectory.Write(back).Should().Equal(bytes);
    }

    private static Qcow2BitmapDirectoryEntry BadEntry(string what) => what switch
    {
        "type" => Entry("t") with { Type = 2 },
        "reserved flag" => Entry("f", flags: 1u << 5),
        "granularity below 512" => Entry("g", bits: 8),
        "granularity above 2 GiB" => Entry("h", bits: 32),
        "extra data without the compatible flag" => Entry("x", extra: [9]),
        "table size not matching the disk" => Entry("s", tableSize: 7),
        "unaligned table" => Entry("u", tableOffset: 4096),
        "table past the end of the file" => Entry("e", tableOffset: 1UL << 40),
        _ => Entry(""),
    };

    [Theory]
    [InlineData("type")]
    [InlineData("reserved flag")]
    [InlineData("granularity below 512")]
    [InlineData("granularity above 2 GiB")]
    [InlineData("extra data without the compatible flag")]
    [InlineData("table size not matching the disk")]
    [InlineData("unaligned table")]
    [InlineData("table past the end of the file")]
    [InlineData("empty name")]
    public void Entries_that_break_the_constraints_are_rejected_by_name(string what)
    {
        var entry = BadEntry(what);
        var bytes = Qcow2BitmapDirectory.Write([entry]);
        Qcow2BitmapDirectory.TryRead(bytes, 1, Disk, Cluster, 1L << 30, out _, out var error).Should().BeFalse(what);
        error.Should().Be($"Bitmap '{entry.Name}' doesn't satisfy the constraints", what);
    }

    [Fact]
    public void Truncated_trailing_and_duplicate_directories_are_rejected()
    {
        var bytes = Qcow2BitmapDirectory.Write([Entry("a"), Entry("b")]);
        Qcow2BitmapDirectory.TryRead(bytes.AsSpan(0, 40), 2, Disk, Cluster, 1L << 30, out _, out var error).Should().BeFalse();
        error.Should().Be("Broken bitmap directory");
        Qcow2BitmapDirectory.TryRead(bytes, 1, Disk, Cluster, 1L << 30, out _, out error).Should().BeFalse();
        error.Should().Be("Broken bitmap directory");
        Qcow2BitmapDirectory.TryRead(bytes.AsSpan(0, 10), 1, Disk, Cluster, 1L << 30, out _, out error).Should().BeFalse();
        error.Should().Be("Broken bitmap directory");
        var twice = Qcow2BitmapDirectory.Write([Entry("a"), Entry("a")]);
        Qcow2BitmapDirectory.TryRead(twice, 2, Disk, Cluster, 1L << 30, out _, out error).Should().BeFalse();
        error.Should().Be("Bitmap 'a' is stored twice in the bitmap directory");
    }

    [Fact]
    public void Random_garbage_never_throws()
    {
        var rng = new Random(8);
        for (var i = 0; i < 2000; i++)
        {
            var bytes = new byte[rng.Next(0, 200)];
            rng.NextBytes(bytes);
            var act = () => Qcow2BitmapDirectory.TryRead(bytes, (uint)rng.Next(0, 4), Disk, Cluster, 1L << 30, out _, out _);
            act.Should().NotThrow();
            var ext = () => Qcow2BitmapsExtension.TryRead(bytes.AsSpan(0, Math.Min(bytes.Length, 24)), Cluster, out _, out _);
            ext.Should().NotThrow();
        }
    }

    [Theory]
    [InlineData(64L << 20, 65536, 65536, 1)]
    [InlineData(64L << 20, 512, 512, 32)]
    [InlineData(1L << 40, 65536, 65536, 32)]
    [InlineData(256L << 20, 512, 512, 128)]
    [InlineData(1, 512, 65536, 1)]
    public void Table_size_is_one_entry_per_cluster_of_bits(long disk, long granularity, int cluster, long expected) =>
        Qcow2BitmapDirectoryEntry.TableSizeFor(disk, granularity, cluster).Should().Be(expected);

    [Fact]
    public void Constraints_match_qemu()
    {
        Qcow2BitmapDirectoryEntry.CheckConstraints(1023, 65536, Disk, Cluster).Should().BeNull();
        Qcow2BitmapDirectoryEntry.CheckConstraints(1024, 65536, Disk, Cluster).Should().Be("Name length exceeds maximum (1023 characters)");
        // 512 MiB of bits is the most QEMU keeps in memory: 2^32 granules of 512 B is 2 TiB.
        Qcow2BitmapDirectoryEntry.CheckConstraints(1, 512, 2L << 40, Cluster).Should().BeNull();
        Qcow2BitmapDirectoryEntry.CheckConstraints(1, 512, (2L << 40) + 512, Cluster)
            .Should().Be("Too much space will be occupied by the bitmap. Use larger granularity");
    }

    [Fact]
    public void Table_entries_decode_zero_ones_and_offsets()
    {
        new Qcow2BitmapTableEntry(0).IsAllZeros.Should().BeTrue();
        new Qcow2BitmapTableEntry(1).IsAllOnes.Should().BeTrue();
        new Qcow2BitmapTableEntry(5 * Cluster).Offset.Should().Be(5 * Cluster);
        new Qcow2BitmapTableEntry(5 * Cluster).IsValid(Cluster).Should().BeTrue();
        new Qcow2BitmapTableEntry(5 * Cluster + 1).IsValid(Cluster).Should().BeFalse("all-ones only without an offset");
        new Qcow2BitmapTableEntry(512).IsValid(Cluster).Should().BeFalse("unaligned");
        new Qcow2BitmapTableEntry(1UL << 60).IsValid(Cluster).Should().BeFalse("reserved bits");
    }
}
