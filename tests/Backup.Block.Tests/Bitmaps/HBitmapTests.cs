using System.Security.Cryptography;
using Backup.Block.Bitmaps;

namespace Backup.Block.Tests.Bitmaps;

public sealed class HBitmapTests
{
    private const long MiB = 1024 * 1024;

    [Fact]
    public void Empty_64MiB_64KiB_bitmap_hashes_like_qsd()
    {
        var b = new HBitmap(64 * MiB, 16);
        b.Sha256().Should().Be("38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca");
    }

    [Fact]
    public void Sha256_is_over_little_endian_words_padded_to_whole_words()
    {
        // 100 chunks -> 2 words; chunk 0 and chunk 65 set.
        var b = new HBitmap(100 * 512, 9);
        b.Set(0, 1);
        b.Set(65 * 512, 512);
        var expected = new byte[16];
        expected[0] = 0x01;
        expected[8] = 0x02;
        b.Sha256().Should().Be(Convert.ToHexStringLower(SHA256.HashData(expected)));
    }

    [Fact]
    public void Zero_sized_bitmap_has_one_word_like_qemu()
    {
        var b = new HBitmap(0, 16);
        b.ChunkCount.Should().Be(1);
        b.Sha256().Should().Be(Convert.ToHexStringLower(SHA256.HashData(new byte[8])));
        b.NextDirty(0).Should().Be(-1);
        b.NextDirtyExtent(0).Should().BeNull();
    }

    [Fact]
    public void Count_is_chunks_times_granularity_not_clipped_to_size()
    {
        // A 2 GiB-granularity bitmap on a 64 MiB node counts 2 GiB after one write (QSD).
        var b = new HBitmap(64 * MiB, 31);
        b.Set(4096, 512);
        b.DirtyChunkCount.Should().Be(1);
        b.DirtyByteCount.Should().Be(2147483648L);
    }

    [Fact]
    public void Set_widens_to_whole_chunks_and_reset_clears_whole_chunks()
    {
        var b = new HBitmap(1 * MiB, 16);
        b.Set(65535, 2); // touches chunks 0 and 1
        b.DirtyChunkCount.Should().Be(2);
        b.Get(0).Should().BeTrue();
        b.Get(131071).Should().BeTrue();
        b.Get(131072).Should().BeFalse();
        b.Reset(65536, 1); // clears all of chunk 1
        b.DirtyChunkCount.Should().Be(1);
        b.Get(65536).Should().BeFalse();
    }

    [Fact]
    public void Searches_clamp_to_the_start_offset()
    {
        var b = new HBitmap(1 * MiB, 16);
        b.Set(0, 65536);
        b.NextDirty(100).Should().Be(100);
        b.NextClean(100).Should().Be(65536);
        b.NextDirtyExtent(100).Should().Be(new BitmapExtent(100, 65436));
        b.NextDirtyExtent(100, 10).Should().Be(new BitmapExtent(100, 10));
        b.NextDirty(65536).Should().Be(-1);
        b.NextClean(0, 65536).Should().Be(-1);
    }

    [Fact]
    public void Last_partial_chunk_is_covered_and_counted_whole()
    {
        var b = new HBitmap(100_000, 16); // 2 chunks, the second 34464 bytes long
        b.Set(99_999, 1);
        b.DirtyByteCount.Should().Be(65536);
        b.NextDirtyExtent(0).Should().Be(new BitmapExtent(65536, 100_000 - 65536));
        b.NextClean(65536).Should().Be(-1);
    }

    [Fact]
    public void Ranges_outside_the_bitmap_throw()
    {
        var b = new HBitmap(1 * MiB, 16);
        b.Invoking(x => x.Set(-1, 1)).Should().Throw<ArgumentOutOfRangeException>();
        b.Invoking(x => x.Set(MiB - 1, 2)).Should().Throw<ArgumentOutOfRangeException>();
        b.Invoking(x => x.Reset(MiB, 1)).Should().Throw<ArgumentOutOfRangeException>();
        b.Invoking(x => x.Set(MiB, 0)).Should().NotThrow();
    }

    [Fact]
    public void Next_dirty_far_away_in_a_16TiB_bitmap()
    {
        var b = new HBitmap(16L << 40, 16);
        b.ChunkCount.Should().Be(1L << 28);
        var target = (12345L << 20) * 1024 + 7 * 65536;
        b.Set(target, 4096);
        b.NextDirty(0).Should().Be(target);
        b.NextDirty(target + 65536).Should().Be(-1);
        b.NextDirty(0, target).Should().Be(-1);
        b.NextDirtyExtent(1).Should().Be(new BitmapExtent(target, 65536));
        b.Reset(target - (1L << 30), 2L << 30);
        b.IsEmpty.Should().BeTrue();
        b.NextDirty(0).Should().Be(-1);
    }

    [Fact]
    public void Summary_levels_cost_at_most_a_63rd_of_the_flat_array_at_16TiB()
    {
        var b = new HBitmap(16L << 40, 16);
        b.FlatMemoryBytes.Should().Be(32 * MiB);
        (b.MemoryBytes - b.FlatMemoryBytes).Should().BeLessThanOrEqualTo(b.FlatMemoryBytes / 63);
    }

    [Fact]
    public void Set_and_reset_of_a_1GiB_range_keep_the_hierarchy_consistent()
    {
        var b = new HBitmap(16L << 40, 16);
        b.Set(5L << 40, 1L << 30);
        b.DirtyByteCount.Should().Be(1L << 30);
        b.NextDirtyExtent(0).Should().Be(new BitmapExtent(5L << 40, 1L << 30));
        b.Reset((5L << 40) + 65536, (1L << 30) - 2 * 65536);
        b.DirtyChunkCount.Should().Be(2);
        b.NextDirty(0).Should().Be(5L << 40);
        b.NextDirty((5L << 40) + 1).Should().Be((5L << 40) + 1);
        b.NextDirty((5L << 40) + 65536).Should().Be((5L << 40) + (1L << 30) - 65536);
    }

    [Fact]
    public void Serialization_layout_is_bit_i_of_byte_j_is_chunk_8j_plus_i()
    {
        var b = new HBitmap(64 * 512, 9);
        b.Set(0, 512);       // chunk 0
        b.Set(9 * 512, 512); // chunk 9 = byte 1 bit 1
        b.Set(63 * 512, 512);
        var data = b.Serialize(0, 64 * 512);
        data.Should().HaveCount(8);
        data[0].Should().Be(0x01);
        data[1].Should().Be(0x02);
        data[7].Should().Be(0x80);
        // An unaligned (non-64) start shifts the bits.
        b.Serialize(8 * 512, 16 * 512).Should().Equal(0x02, 0x00);
    }

    [Fact]
    public void Deserialize_replaces_bits_and_updates_count_and_meta()
    {
        var b = new HBitmap(1000 * 512, 9);
        b.Set(0, 1000 * 512);
        var meta = b.CreateMeta(1);
        b.Deserialize(512 * 8, 512 * 16, [0x00, 0x0F]);
        b.DirtyChunkCount.Should().Be(1000 - 16 + 4);
        b.Get(512 * 8).Should().BeFalse();
        b.Get(512 * 16).Should().BeTrue();
        meta.IsEmpty.Should().BeFalse();
    }

    [Fact]
    public void Merge_requires_equal_sizes()
    {
        var a = new HBitmap(MiB, 16);
        var b = new HBitmap(2 * MiB, 16);
        a.Invoking(x => x.Merge(b)).Should().Throw<ArgumentException>()
            .WithMessage("Bitmaps are of different sizes (destination size is 1048576, source size is 2097152)*");
    }

    [Fact]
    public void Merge_from_coarser_sets_whole_coarse_chunk_and_from_finer_sets_enclosing_chunk()
    {
        var fine = new HBitmap(MiB, 12);
        var coarse = new HBitmap(MiB, 16);
        coarse.Set(65536, 1);
        fine.Merge(coarse);
        fine.NextDirtyExtent(0).Should().Be(new BitmapExtent(65536, 65536));
        fine.DirtyChunkCount.Should().Be(16);

        var fine2 = new HBitmap(MiB, 12);
        fine2.Set(3 * 65536 + 4096, 1);
        var coarse2 = new HBitmap(MiB, 16);
        coarse2.Merge(fine2);
        coarse2.NextDirtyExtent(0).Should().Be(new BitmapExtent(3 * 65536, 65536));
    }

    [Fact]
    public void Truncate_drops_bits_past_the_end_and_grows_clean()
    {
        var b = new HBitmap(10 * MiB, 16);
        b.Set(0, 10 * MiB);
        b.Truncate(MiB + 100);
        b.ChunkCount.Should().Be(17);
        b.DirtyChunkCount.Should().Be(17);
        b.Truncate(10 * MiB);
        b.DirtyChunkCount.Should().Be(17);
        b.NextClean(0).Should().Be(17 * 65536);
        b.NextDirty(17 * 65536).Should().Be(-1);
    }

    [Fact]
    public void Meta_bitmap_records_changed_ranges_at_coarser_granularity()
    {
        var b = new HBitmap(64 * MiB, 16);
        var meta = b.CreateMeta(1); // one meta bit per 8 chunks = 512 KiB
        meta.Granularity.Should().Be(512 * 1024);
        b.Set(3 * MiB, 4096);
        meta.NextDirtyExtent(0).Should().Be(new BitmapExtent(3 * MiB, 512 * 1024));
        meta.Clear();
        b.Set(3 * MiB, 4096); // already dirty: no change, no meta mark
        meta.IsEmpty.Should().BeTrue();
        b.Reset(3 * MiB, 1);
        meta.IsEmpty.Should().BeFalse();
        b.Invoking(x => x.CreateMeta(1)).Should().Throw<InvalidOperationException>();
        b.ReleaseMeta();
        b.Meta.Should().BeNull();
    }

    [Fact]
    public void Concurrent_marking_from_many_threads_loses_nothing()
    {
        var b = new HBitmap(1L << 32, 16);
        var chunks = b.ChunkCount;
        Parallel.For(0, 8, t =>
        {
            for (long c = t; c < chunks; c += 8)
            {
                b.Set(c << 16, 4096);
                b.Set(c << 16, 4096);
            }
        });
        b.DirtyChunkCount.Should().Be(chunks);
        b.NextClean(0).Should().Be(-1);
    }

    // ------------------------------------------------------------------ randomized against a bool[] model

    [Theory]
    [InlineData(1, 0, 1000)]
    [InlineData(2, 0, 64)]
    [InlineData(3, 0, 4097)]
    [InlineData(4, 3, 300_000)]     // 3 levels
    [InlineData(5, 9, 5_000_000)]   // partial last chunk
    [InlineData(6, 0, 262_145)]     // 4097 words: just over two summary levels
    public void Randomized_against_model(int seed, int shift, long size)
    {
        var rng = new Random(seed);
        var b = new HBitmap(size, shift);
        var model = new Model(size, shift);
        b.ChunkCount.Should().Be(model.Bits.Length);
        for (var round = 0; round < 400; round++)
        {
            var (off, len) = RandomRange(rng, size, model.Granularity);
            switch (rng.Next(10))
            {
                case < 5:
                    b.Set(off, len);
                    model.Set(off, len);
                    break;
                case < 8:
                    b.Reset(off, len);
                    model.Reset(off, len);
                    break;
                case 8:
                    {
                        // Serialize a random aligned range, deserialize it into a clean copy.
                        var (so, sl) = AlignedRange(rng, size, model.Granularity);
                        var data = b.Serialize(so, sl);
                        data.Length.Should().Be((int)b.SerializationSize(so, sl));
                        data.Should().Equal(model.Serialize(so, sl));
                        var copy = new HBitmap(size, shift);
                        copy.Deserialize(so, sl, data);
                        copy.Serialize(so, sl).Should().Equal(data);
                        // And write random bits back into the bitmap under test.
                        var fresh = new byte[data.Length];
                        rng.NextBytes(fresh);
                        b.Deserialize(so, sl, fresh);
                        model.Deserialize(so, sl, fresh);
                        break;
                    }
                default:
                    {
                        var c = b.Clone();
                        c.Serialize(0, size).Should().Equal(b.Serialize(0, size));
                        break;
                    }
            }
            b.DirtyChunkCount.Should().Be(model.Count, "count after round {0}", round);
            for (var q = 0; q < 3; q++)
            {
                var o = size == 0 ? 0 : rng.NextInt64(size);
                var lim = rng.Next(4) == 0 ? long.MaxValue : rng.NextInt64(size - o + 1);
                b.NextDirty(o, lim).Should().Be(model.NextDirty(o, lim), "NextDirty({0},{1}) round {2}", o, lim, round);
                b.NextClean(o, lim).Should().Be(model.NextClean(o, lim), "NextClean({0},{1}) round {2}", o, lim, round);
                b.NextDirtyExtent(o, lim).Should().Be(model.NextDirtyExtent(o, lim), "extent({0},{1}) round {2}", o, lim, round);
                b.Get(o).Should().Be(model.Get(o));
            }
        }
        b.Serialize(0, size).Should().Equal(model.Serialize(0, size));
        b.DirtyExtents().Sum(e => e.Length).Should().Be(model.DirtyBytesClipped());
        b.Sha256().Should().Be(model.Sha256());
    }

    [Theory]
    [InlineData(11, 9, 16, 3_000_000)]
    [InlineData(12, 16, 9, 3_000_000)]
    [InlineData(13, 12, 12, 3_000_001)]
    [InlineData(14, 10, 20, 5_555_555)]
    public void Merge_across_granularities_against_model(int seed, int srcShift, int dstShift, long size)
    {
        var rng = new Random(seed);
        var src = new HBitmap(size, srcShift);
        var dst = new HBitmap(size, dstShift);
        var srcModel = new Model(size, srcShift);
        var dstModel = new Model(size, dstShift);
        for (var i = 0; i < 40; i++)
        {
            var (o, l) = RandomRange(rng, size, 1L << srcShift);
            src.Set(o, l);
            srcModel.Set(o, l);
            (o, l) = RandomRange(rng, size, 1L << dstShift);
            dst.Set(o, l);
            dstModel.Set(o, l);
        }
        dst.Merge(src);
        dstModel.Merge(srcModel);
        dst.DirtyChunkCount.Should().Be(dstModel.Count);
        dst.Serialize(0, size).Should().Equal(dstModel.Serialize(0, size));
        src.DirtyChunkCount.Should().Be(srcModel.Count, "the source is unchanged");
    }

    [Theory]
    [InlineData(21, 9)]
    [InlineData(22, 16)]
    [InlineData(23, 0)]
    public void Truncate_against_model(int seed, int shift)
    {
        var rng = new Random(seed);
        long size = 1_000_000;
        var b = new HBitmap(size, shift);
        var model = new Model(size, shift);
        for (var round = 0; round < 30; round++)
        {
            for (var i = 0; i < 5; i++)
            {
                var (o, l) = RandomRange(rng, size, 1L << shift);
                b.Set(o, l);
                model.Set(o, l);
            }
            size = rng.NextInt64(0, 2_000_000);
            b.Truncate(size);
            model = model.Truncated(size);
            b.ChunkCount.Should().Be(model.Bits.Length);
            b.DirtyChunkCount.Should().Be(model.Count);
            b.Serialize(0, size).Should().Equal(model.Serialize(0, size));
            b.Sha256().Should().Be(model.Sha256());
            if (size > 0)
            {
                var o = rng.NextInt64(size);
                b.NextDirty(o).Should().Be(model.NextDirty(o, long.MaxValue));
                b.NextClean(o).Should().Be(model.NextClean(o, long.MaxValue));
            }
        }
    }

    private static (long Offset, long Length) RandomRange(Random rng, long size, long granularity)
    {
        if (size == 0)
        {
            return (0, 0);
        }
        var o = rng.NextInt64(size);
        var maxLen = size - o;
        var len = rng.Next(3) switch
        {
            0 => Math.Min(maxLen, 1 + rng.NextInt64(granularity * 3)),
            1 => Math.Min(maxLen, 1 + rng.NextInt64(granularity * 200)),
            _ => 1 + rng.NextInt64(maxLen),
        };
        return (o, len);
    }

    private static (long Offset, long Length) AlignedRange(Random rng, long size, long granularity)
    {
        var chunks = (size + granularity - 1) / granularity;
        var first = rng.NextInt64(chunks + 1);
        var count = rng.NextInt64(chunks - first + 1);
        var offset = first * granularity;
        var end = Math.Min(size, (first + count) * granularity);
        return (Math.Min(offset, size), Math.Max(0, end - Math.Min(offset, size)));
    }

    /// <summary>The obvious implementation: one bool per chunk.</summary>
    private sealed class Model
    {
        public Model(long size, int shift)
        {
            Size = size;
            Shift = shift;
            Bits = new bool[Math.Max(1, (size + (1L << shift) - 1) >> shift)];
        }

        public long Size { get; }
        public int Shift { get; }
        public long Granularity => 1L << Shift;
        public bool[] Bits { get; private set; }
        public long Count => Bits.LongCount(x => x);

        public void Set(long o, long l) => Fill(o, l, true);

        public void Reset(long o, long l) => Fill(o, l, false);

        private void Fill(long o, long l, bool v)
        {
            if (l == 0)
            {
                return;
            }
            for (var c = o >> Shift; c <= (o + l - 1) >> Shift; c++)
            {
                Bits[c] = v;
            }
        }

        public bool Get(long o) => Bits[o >> Shift];

        private long End(long o, long lim) => o >= Size ? o : (lim >= Size - o ? Size : o + lim);

        public long NextDirty(long o, long lim)
        {
            var end = End(o, lim);
            for (var c = o >> Shift; end > o && c <= (end - 1) >> Shift; c++)
            {
                if (Bits[c])
                {
                    return Math.Max(o, c << Shift);
                }
            }
            return -1;
        }

        public long NextClean(long o, long lim)
        {
            var end = End(o, lim);
            for (var c = o >> Shift; end > o && c <= (end - 1) >> Shift; c++)
            {
                if (!Bits[c])
                {
                    return Math.Max(o, c << Shift);
                }
            }
            return -1;
        }

        public BitmapExtent? NextDirtyExtent(long o, long lim)
        {
            var start = NextDirty(o, lim);
            if (start < 0)
            {
                return null;
            }
            var end = End(o, lim);
            var clean = NextClean(start, end - start);
            return new BitmapExtent(start, (clean < 0 ? end : clean) - start);
        }

        public long DirtyBytesClipped()
        {
            long n = 0;
            for (long c = 0; c < Bits.Length; c++)
            {
                if (Bits[c])
                {
                    n += Math.Min(Size, (c + 1) << Shift) - Math.Min(Size, c << Shift);
                }
            }
            return n;
        }

        private (long First, long Count) Chunks(long o, long l)
        {
            var first = o >> Shift;
            var endChunk = o + l == Size ? Bits.Length : (o + l) >> Shift;
            return l == 0 ? (first, 0) : (first, endChunk - first);
        }

        public byte[] Serialize(long o, long l)
        {
            var (first, count) = Chunks(o, l);
            var data = new byte[(count + 7) / 8];
            for (long i = 0; i < count; i++)
            {
                if (Bits[first + i])
                {
                    data[i / 8] |= (byte)(1 << (int)(i % 8));
                }
            }
            return data;
        }

        public void Deserialize(long o, long l, byte[] data)
        {
            var (first, count) = Chunks(o, l);
            for (long i = 0; i < count; i++)
            {
                Bits[first + i] = (data[i / 8] & (1 << (int)(i % 8))) != 0;
            }
        }

        public void Merge(Model src)
        {
            for (long c = 0; c < src.Bits.Length; c++)
            {
                if (!src.Bits[c])
                {
                    continue;
                }
                var start = c << src.Shift;
                var end = Math.Min(Size, (c + 1) << src.Shift);
                if (end > start)
                {
                    Set(start, end - start);
                }
            }
        }

        public Model Truncated(long size)
        {
            var m = new Model(size, Shift);
            Array.Copy(Bits, m.Bits, Math.Min(Bits.Length, m.Bits.Length));
            return m;
        }

        public string Sha256()
        {
            var words = (Bits.Length + 63) / 64;
            var data = new byte[words * 8];
            for (var c = 0; c < Bits.Length; c++)
            {
                if (Bits[c])
                {
                    data[c / 8] |= (byte)(1 << (c % 8));
                }
            }
            return Convert.ToHexStringLower(SHA256.HashData(data));
        }
    }
}
