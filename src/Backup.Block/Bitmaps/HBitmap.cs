using System.Buffers.Binary;
using System.Numerics;
using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace Backup.Block.Bitmaps;

/// <summary>A run of bytes, as returned by <see cref="HBitmap.NextDirtyExtent"/>.</summary>
public readonly record struct BitmapExtent(long Offset, long Length)
{
    public long End => Offset + Length;
}

/// <summary>
/// A hierarchical bitmap over the bytes <c>[0, Size)</c> of a node, one bit per chunk of
/// <see cref="Granularity"/> bytes (the design of QEMU's util/hbitmap; see include/qemu/hbitmap.h).
/// </summary>
/// <remarks>
/// <para><b>Layout.</b> Level 0 is the flat bit array: bit <c>c</c> of the little-endian 64-bit word
/// <c>c / 64</c> is chunk <c>c</c>. Level k+1 has one bit per word of level k, set iff that word is
/// nonzero. Levels are added until one has at most <see cref="TopLevelWords"/> words; that top level is
/// scanned linearly (vectorised). Finding the next dirty chunk therefore costs O(levels) word operations
/// however far away it is, and the summary levels cost 1/64 + 1/64² + … ≈ 1/63 of the flat array.
/// Bits past the last chunk are always zero, on every level.</para>
/// <para><b>Byte API.</b> Every range is in bytes and must lie within <c>[0, Size)</c>; it is widened
/// to whole chunks (a write of one byte dirties its whole chunk). Offsets returned by searches are
/// clamped to the start of the searched range. <see cref="DirtyByteCount"/> is dirty chunks ×
/// granularity, not clipped to <see cref="Size"/> (QEMU's <c>count</c>).</para>
/// <para><b>Locking.</b> One lock per bitmap serialises every mutation and every multi-word read
/// (searches, counts, serialization, hashing), so readers always see a consistent hierarchy.
/// <see cref="Get"/> and the "already dirty" check at the start of <see cref="Set"/> read a single
/// word without the lock: bits are only cleared under the lock, so seeing a set bit means the set
/// would have been a no-op at that instant (the check is linearisable). That keeps marking a write
/// that lands in an already dirty chunk to one load and a compare. <see cref="Merge"/> locks both
/// bitmaps in a global order, so A.Merge(B) racing B.Merge(A) cannot deadlock. A meta bitmap is
/// updated while this bitmap's lock is held (order: bitmap, then its meta).</para>
/// </remarks>
public sealed class HBitmap
{
    /// <summary>Levels are stacked until one is at most this many words long; that one is scanned.</summary>
    public const int TopLevelWords = 64;

    /// <summary>The largest granularity shift; 2^62 bytes is more than any node.</summary>
    public const int MaxGranularityShift = 62;

    private static long s_nextLockOrder;

    private readonly Lock _lock = new();
    private readonly long _lockOrder = Interlocked.Increment(ref s_nextLockOrder);
    private readonly int _shift;

    /// <summary>[0] is the flat bit array; [^1] the small top level. Replaced only by <see cref="Truncate"/>.</summary>
    private ulong[][] _levels;
    private long _size;
    private long _chunks;
    private long _count;
    private HBitmap? _meta;

    /// <param name="size">The number of bytes covered (the node's length).</param>
    /// <param name="granularityShift">log2 of the bytes per bit.</param>
    public HBitmap(long size, int granularityShift)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(size);
        ArgumentOutOfRangeException.ThrowIfNegative(granularityShift);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(granularityShift, MaxGranularityShift);
        _shift = granularityShift;
        _size = size;
        _chunks = ChunksFor(size, granularityShift);
        _levels = Allocate(_chunks);
    }

    /// <summary>Bytes covered.</summary>
    public long Size
    {
        get
        {
            lock (_lock)
            {
                return _size;
            }
        }
    }

    public int GranularityShift => _shift;

    /// <summary>Bytes per bit.</summary>
    public long Granularity => 1L << _shift;

    /// <summary>Number of bits: ceil(Size / Granularity), at least 1 (as in QEMU, so that an empty node still hashes one word).</summary>
    public long ChunkCount
    {
        get
        {
            lock (_lock)
            {
                return _chunks;
            }
        }
    }

    /// <summary>Dirty chunks.</summary>
    public long DirtyChunkCount
    {
        get
        {
            lock (_lock)
            {
                return _count;
            }
        }
    }

    /// <summary>Dirty chunks × granularity: what QMP reports as <c>count</c>. Not clipped to <see cref="Size"/>.</summary>
    public long DirtyByteCount
    {
        get
        {
            lock (_lock)
            {
                return _count << _shift;
            }
        }
    }

    public bool IsEmpty => DirtyChunkCount == 0;

    /// <summary>Bytes held by the bit arrays: the flat array plus the summary levels.</summary>
    public long MemoryBytes
    {
        get
        {
            lock (_lock)
            {
                return _levels.Sum(l => (long)l.Length) * sizeof(ulong);
            }
        }
    }

    /// <summary>Bytes the flat array alone takes (level 0).</summary>
    public long FlatMemoryBytes
    {
        get
        {
            lock (_lock)
            {
                return (long)_levels[0].Length * sizeof(ulong);
            }
        }
    }

    /// <summary>The meta bitmap created by <see cref="CreateMeta"/>, or null.</summary>
    public HBitmap? Meta
    {
        get
        {
            lock (_lock)
            {
                return _meta;
            }
        }
    }

    // ------------------------------------------------------------------ single bits

    /// <summary>Whether the chunk holding <paramref name="offset"/> is dirty. Lock-free (one word read).</summary>
    public bool Get(long offset)
    {
        var bits = Volatile.Read(ref _levels)[0];
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        var chunk = offset >> _shift;
        if (chunk >= (long)bits.Length * 64)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), offset, "beyond the end of the bitmap");
        }
        return (Volatile.Read(ref bits[chunk >> 6]) & (1UL << (int)(chunk & 63))) != 0;
    }

    // ------------------------------------------------------------------ set / reset

    /// <summary>
    /// Lock-free: true when <c>[offset, offset + length)</c> lies in one 64-chunk word whose bits are all
    /// set, i.e. setting it would change nothing. False means "unknown" (take the slow path).
    /// </summary>
    internal bool IsAllDirtyFast(long offset, long length)
    {
        if (offset < 0 || length <= 0 || offset > long.MaxValue - length)
        {
            return false;
        }
        var first = offset >> _shift;
        var last = (offset + length - 1) >> _shift;
        if ((first >> 6) != (last >> 6))
        {
            return false;
        }
        var bits = Volatile.Read(ref _levels)[0];
        var w = first >> 6;
        if (w >= bits.Length)
        {
            return false;
        }
        var mask = Mask((int)(first & 63), (int)(last & 63));
        return (Volatile.Read(ref bits[w]) & mask) == mask;
    }

    /// <summary>Marks the chunks that <c>[offset, offset + length)</c> touches as dirty.</summary>
    public void Set(long offset, long length)
    {
        if (length == 0)
        {
            CheckOffset(offset);
            return;
        }
        // Fast path, no lock: a range inside one word whose bits are all set already.
        if (IsAllDirtyFast(offset, length))
        {
            return;
        }
        lock (_lock)
        {
            var (first, last) = ChunkRange(offset, length);
            SetChunksLocked(first, last);
        }
    }

    /// <summary>Marks the chunks that <c>[offset, offset + length)</c> touches as clean.</summary>
    public void Reset(long offset, long length)
    {
        lock (_lock)
        {
            if (length == 0)
            {
                CheckOffset(offset);
                return;
            }
            var (first, last) = ChunkRange(offset, length);
            ResetChunksLocked(first, last);
        }
    }

    /// <summary>Marks every chunk dirty.</summary>
    public void SetAll()
    {
        lock (_lock)
        {
            SetChunksLocked(0, _chunks - 1);
        }
    }

    /// <summary>Marks every chunk clean.</summary>
    public void Clear()
    {
        lock (_lock)
        {
            if (_count == 0)
            {
                return;
            }
            foreach (var level in _levels)
            {
                Array.Clear(level);
            }
            _count = 0;
            _meta?.SetAll();
        }
    }

    private void SetChunksLocked(long first, long last)
    {
        var added = SetBits(_levels[0], first, last);
        if (added == 0)
        {
            return;
        }
        _count += added;
        long a = first >> 6, b = last >> 6;
        for (var k = 1; k < _levels.Length; k++)
        {
            // Every word of level k-1 in [a, b] is now nonzero.
            SetBits(_levels[k], a, b);
            a >>= 6;
            b >>= 6;
        }
        MarkMetaLocked(first, last);
    }

    private void ResetChunksLocked(long first, long last)
    {
        var removed = ClearBits(_levels[0], first, last);
        if (removed == 0)
        {
            return;
        }
        _count -= removed;
        long a = first, b = last;
        for (var k = 1; k < _levels.Length; k++)
        {
            var below = _levels[k - 1];
            var level = _levels[k];
            long wa = a >> 6, wb = b >> 6;
            // Words strictly between the end words were wholly inside the cleared range: now zero.
            if (wb - wa >= 2)
            {
                ClearBits(level, wa + 1, wb - 1);
            }
            if (below[wa] == 0)
            {
                level[wa >> 6] &= ~(1UL << (int)(wa & 63));
            }
            if (wb != wa && below[wb] == 0)
            {
                level[wb >> 6] &= ~(1UL << (int)(wb & 63));
            }
            a = wa;
            b = wb;
        }
        MarkMetaLocked(first, last);
    }

    // ------------------------------------------------------------------ searches

    /// <summary>
    /// The first dirty byte in <c>[offset, offset + limit)</c> (clipped to <see cref="Size"/>), or -1.
    /// A chunk that starts before <paramref name="offset"/> but is dirty yields <paramref name="offset"/>.
    /// </summary>
    public long NextDirty(long offset, long limit = long.MaxValue)
    {
        lock (_lock)
        {
            var end = RangeEnd(offset, limit);
            if (end <= offset)
            {
                return -1;
            }
            var endChunk = ((end - 1) >> _shift) + 1;
            var c = NextSetChunkLocked(offset >> _shift, endChunk);
            return c < 0 ? -1 : Math.Max(offset, c << _shift);
        }
    }

    /// <summary>The first clean byte in <c>[offset, offset + limit)</c> (clipped to <see cref="Size"/>), or -1.</summary>
    public long NextClean(long offset, long limit = long.MaxValue)
    {
        lock (_lock)
        {
            var end = RangeEnd(offset, limit);
            if (end <= offset)
            {
                return -1;
            }
            var endChunk = ((end - 1) >> _shift) + 1;
            var c = NextClearChunkLocked(offset >> _shift, endChunk);
            return c < 0 ? -1 : Math.Max(offset, c << _shift);
        }
    }

    /// <summary>
    /// The first run of dirty bytes that starts in <c>[offset, offset + limit)</c>, cut at the end of that
    /// range (and at <see cref="Size"/>), or null when the range is clean (QEMU's hbitmap_next_dirty_area).
    /// </summary>
    public BitmapExtent? NextDirtyExtent(long offset, long limit = long.MaxValue)
    {
        lock (_lock)
        {
            var end = RangeEnd(offset, limit);
            if (end <= offset)
            {
                return null;
            }
            var endChunk = ((end - 1) >> _shift) + 1;
            var c = NextSetChunkLocked(offset >> _shift, endChunk);
            if (c < 0)
            {
                return null;
            }
            var start = Math.Max(offset, c << _shift);
            var z = NextClearChunkLocked(c, endChunk);
            var stop = z < 0 ? end : Math.Min(end, z << _shift);
            return new BitmapExtent(start, stop - start);
        }
    }

    /// <summary>Every dirty extent in <c>[offset, offset + length)</c>, in order, each cut to that range.</summary>
    public IEnumerable<BitmapExtent> DirtyExtents(long offset = 0, long length = long.MaxValue)
    {
        var end = RangeEnd(offset, length);
        var pos = offset;
        while (pos < end && NextDirtyExtent(pos, end - pos) is { } e)
        {
            yield return e;
            pos = e.End;
        }
    }

    /// <summary>Index of the first set bit of level 0 in [from, endChunk), or -1.</summary>
    private long NextSetChunkLocked(long from, long endChunk)
    {
        var top = _levels.Length - 1;
        var k = 0;
        var pos = from;
        while (true)
        {
            var words = _levels[k];
            var w = pos >> 6;
            if (w >= words.Length)
            {
                return -1;
            }
            var cur = words[w] & (ulong.MaxValue << (int)(pos & 63));
            if (cur != 0)
            {
                pos = (w << 6) + BitOperations.TrailingZeroCount(cur);
                break;
            }
            if (k == top)
            {
                var rest = words.AsSpan((int)(w + 1));
                var i = rest.IndexOfAnyExcept(0UL);
                if (i < 0)
                {
                    return -1;
                }
                w += 1 + i;
                pos = (w << 6) + BitOperations.TrailingZeroCount(words[w]);
                break;
            }
            // Nothing more in this word: continue with the next word, i.e. the next bit one level up.
            pos = w + 1;
            k++;
        }
        while (k > 0)
        {
            k--;
            pos = (pos << 6) + BitOperations.TrailingZeroCount(_levels[k][pos]);
        }
        return pos < endChunk ? pos : -1;
    }

    /// <summary>Index of the first clear bit of level 0 in [from, endChunk), or -1. Linear, vectorised.</summary>
    private long NextClearChunkLocked(long from, long endChunk)
    {
        endChunk = Math.Min(endChunk, _chunks);
        if (from >= endChunk)
        {
            return -1;
        }
        var bits = _levels[0];
        var w = from >> 6;
        var cur = ~bits[w] & (ulong.MaxValue << (int)(from & 63));
        long found;
        if (cur != 0)
        {
            found = (w << 6) + BitOperations.TrailingZeroCount(cur);
        }
        else
        {
            var endWord = (endChunk + 63) >> 6;
            var rest = bits.AsSpan((int)(w + 1), (int)(endWord - w - 1));
            var i = rest.IndexOfAnyExcept(ulong.MaxValue);
            if (i < 0)
            {
                return -1;
            }
            w += 1 + i;
            found = (w << 6) + BitOperations.TrailingZeroCount(~bits[w]);
        }
        return found < endChunk ? found : -1;
    }

    // ------------------------------------------------------------------ merge, copy, resize

    /// <summary>
    /// this := this OR <paramref name="source"/>. Both must cover the same <see cref="Size"/>; the
    /// granularities may differ: each dirty chunk of the source dirties every chunk of this bitmap that
    /// overlaps it (so a finer destination gets the whole coarse chunk, a coarser one the chunk around it).
    /// </summary>
    public void Merge(HBitmap source)
    {
        ArgumentNullException.ThrowIfNull(source);
        if (ReferenceEquals(source, this))
        {
            return;
        }
        var (firstLock, secondLock) = _lockOrder < source._lockOrder ? (_lock, source._lock) : (source._lock, _lock);
        lock (firstLock)
        {
            lock (secondLock)
            {
                if (source._size != _size)
                {
                    throw new ArgumentException(
                        $"Bitmaps are of different sizes (destination size is {_size}, source size is {source._size})",
                        nameof(source));
                }
                if (source._count == 0)
                {
                    return;
                }
                if (source._shift == _shift)
                {
                    MergeSameGranularityLocked(source);
                    return;
                }
                var end = source._chunks;
                var c = source.NextSetChunkLocked(0, end);
                while (c >= 0)
                {
                    var z = source.NextClearChunkLocked(c, end);
                    var runEnd = z < 0 ? end : z;
                    // Source chunks [c, runEnd) cover bytes [c << s, runEnd << s), cut to the size.
                    var startByte = c << source._shift;
                    var endByte = runEnd >= (long.MaxValue >> source._shift) ? _size : Math.Min(_size, runEnd << source._shift);
                    if (endByte > startByte)
                    {
                        SetChunksLocked(startByte >> _shift, (endByte - 1) >> _shift);
                    }
                    else if (_size == 0)
                    {
                        SetChunksLocked(0, 0);
                    }
                    c = z < 0 ? -1 : source.NextSetChunkLocked(z, end);
                }
            }
        }
    }

    private void MergeSameGranularityLocked(HBitmap source)
    {
        var dst = _levels[0];
        var src = source._levels[0];
        long added = 0;
        long lo = -1, hi = -1;
        for (var w = 0; w < src.Length; w++)
        {
            var s = src[w];
            if (s == 0)
            {
                continue;
            }
            var fresh = s & ~dst[w];
            if (fresh == 0)
            {
                continue;
            }
            dst[w] |= fresh;
            added += BitOperations.PopCount(fresh);
            if (lo < 0)
            {
                lo = w;
            }
            hi = w;
        }
        if (added == 0)
        {
            return;
        }
        _count += added;
        RefreshSummaryLocked(lo, hi);
        MarkMetaLocked(lo << 6, Math.Min(_chunks - 1, (hi << 6) + 63));
    }

    /// <summary>An independent copy of the bits (no meta bitmap).</summary>
    public HBitmap Clone()
    {
        lock (_lock)
        {
            var copy = new HBitmap(_size, _shift);
            for (var k = 0; k < _levels.Length; k++)
            {
                Array.Copy(_levels[k], copy._levels[k], _levels[k].Length);
            }
            copy._count = _count;
            return copy;
        }
    }

    /// <summary>
    /// Resizes to cover <paramref name="newSize"/> bytes: chunks past the new end are dropped, new
    /// chunks are clean (QEMU's hbitmap_truncate). The meta bitmap, if any, is resized too.
    /// </summary>
    public void Truncate(long newSize)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(newSize);
        lock (_lock)
        {
            var newChunks = ChunksFor(newSize, _shift);
            if (newChunks < _chunks)
            {
                // Count what goes away; the arrays are rebuilt below.
                _count -= CountBitsLocked(newChunks, _chunks - 1);
            }
            var old = _levels[0];
            var levels = Allocate(newChunks);
            var keep = Math.Min(old.Length, levels[0].Length);
            Array.Copy(old, levels[0], keep);
            if (newChunks < _chunks && (newChunks & 63) != 0)
            {
                levels[0][newChunks >> 6] &= ulong.MaxValue >> (64 - (int)(newChunks & 63));
            }
            Volatile.Write(ref _levels, levels);
            _size = newSize;
            _chunks = newChunks;
            RefreshSummaryLocked(0, levels[0].Length - 1);
            _meta?.Truncate(newSize);
        }
    }

    private long CountBitsLocked(long first, long last)
    {
        var bits = _levels[0];
        long wa = first >> 6, wb = last >> 6;
        if (wa == wb)
        {
            return BitOperations.PopCount(bits[wa] & Mask((int)(first & 63), (int)(last & 63)));
        }
        long n = BitOperations.PopCount(bits[wa] & (ulong.MaxValue << (int)(first & 63)));
        for (var w = wa + 1; w < wb; w++)
        {
            n += BitOperations.PopCount(bits[w]);
        }
        return n + BitOperations.PopCount(bits[wb] & (ulong.MaxValue >> (63 - (int)(last & 63))));
    }

    /// <summary>Recomputes the summary bits for level-0 words [lo, hi] and everything above them.</summary>
    private void RefreshSummaryLocked(long lo, long hi)
    {
        for (var k = 1; k < _levels.Length; k++)
        {
            var below = _levels[k - 1];
            var level = _levels[k];
            for (var w = lo; w <= hi; w++)
            {
                var bit = 1UL << (int)(w & 63);
                if (below[w] != 0)
                {
                    level[w >> 6] |= bit;
                }
                else
                {
                    level[w >> 6] &= ~bit;
                }
            }
            lo >>= 6;
            hi >>= 6;
        }
    }

    // ------------------------------------------------------------------ serialization

    /// <summary>
    /// Bytes that <see cref="Serialize"/> writes for <c>[offset, offset + length)</c>: one bit per chunk,
    /// rounded up to whole bytes.
    /// </summary>
    public long SerializationSize(long offset, long length)
    {
        lock (_lock)
        {
            var (_, count) = SerializationRange(offset, length);
            return (count + 7) / 8;
        }
    }

    /// <summary>
    /// Writes the bits of the chunks covering <c>[offset, offset + length)</c> in the layout of the qcow2
    /// bitmap extension and of migration: bit i of byte j is chunk <c>offset / Granularity + 8j + i</c>.
    /// <paramref name="offset"/> must be a multiple of the granularity; <paramref name="length"/> may end
    /// mid-chunk only at <see cref="Size"/>. Unused bits of the last byte are zero.
    /// </summary>
    public void Serialize(long offset, long length, Span<byte> destination)
    {
        lock (_lock)
        {
            var (first, count) = SerializationRange(offset, length);
            var bytes = (count + 7) / 8;
            if (destination.Length < bytes)
            {
                throw new ArgumentException($"destination holds {destination.Length} bytes, {bytes} needed", nameof(destination));
            }
            Span<byte> tmp = stackalloc byte[8];
            for (long i = 0; i < count; i += 64)
            {
                var n = (int)Math.Min(64, count - i);
                var v = ExtractLocked(first + i, n);
                var at = (int)(i / 8);
                var nbytes = (n + 7) / 8;
                if (nbytes == 8)
                {
                    BinaryPrimitives.WriteUInt64LittleEndian(destination.Slice(at, 8), v);
                }
                else
                {
                    BinaryPrimitives.WriteUInt64LittleEndian(tmp, v);
                    tmp[..nbytes].CopyTo(destination.Slice(at, nbytes));
                }
            }
        }
    }

    /// <summary>Convenience for <see cref="Serialize(long, long, Span{byte})"/>.</summary>
    public byte[] Serialize(long offset, long length)
    {
        var buffer = new byte[SerializationSize(offset, length)];
        Serialize(offset, length, buffer);
        return buffer;
    }

    /// <summary>
    /// The inverse of <see cref="Serialize(long, long, Span{byte})"/>: replaces the bits of the chunks
    /// covering <c>[offset, offset + length)</c> with those in <paramref name="source"/>. Bits of the last
    /// byte past the range are ignored.
    /// </summary>
    public void Deserialize(long offset, long length, ReadOnlySpan<byte> source)
    {
        lock (_lock)
        {
            var (first, count) = SerializationRange(offset, length);
            var bytes = (count + 7) / 8;
            if (source.Length < bytes)
            {
                throw new ArgumentException($"source holds {source.Length} bytes, {bytes} needed", nameof(source));
            }
            if (count == 0)
            {
                return;
            }
            Span<byte> tmp = stackalloc byte[8];
            var changed = false;
            for (long i = 0; i < count; i += 64)
            {
                var n = (int)Math.Min(64, count - i);
                var at = (int)(i / 8);
                var nbytes = (n + 7) / 8;
                ulong v;
                if (nbytes == 8)
                {
                    v = BinaryPrimitives.ReadUInt64LittleEndian(source.Slice(at, 8));
                }
                else
                {
                    tmp.Clear();
                    source.Slice(at, nbytes).CopyTo(tmp);
                    v = BinaryPrimitives.ReadUInt64LittleEndian(tmp);
                }
                changed |= InsertLocked(first + i, n, v);
            }
            if (!changed)
            {
                return;
            }
            var last = first + count - 1;
            RefreshSummaryLocked(first >> 6, last >> 6);
            MarkMetaLocked(first, last);
        }
    }

    private (long First, long Count) SerializationRange(long offset, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        if ((offset & (Granularity - 1)) != 0)
        {
            throw new ArgumentException($"offset {offset} is not a multiple of the granularity {Granularity}", nameof(offset));
        }
        if (offset > _size || length > _size - offset)
        {
            throw new ArgumentOutOfRangeException(nameof(length), $"[{offset}, +{length}) is outside the bitmap of size {_size}");
        }
        var end = offset + length;
        if ((end & (Granularity - 1)) != 0 && end != _size)
        {
            throw new ArgumentException($"the range must end on a chunk boundary or at the end of the bitmap", nameof(length));
        }
        var first = offset >> _shift;
        var endChunk = end == _size ? _chunks : end >> _shift;
        if (length == 0)
        {
            endChunk = first;
        }
        return (first, endChunk - first);
    }

    /// <summary>The <paramref name="n"/> (1..64) bits of level 0 starting at chunk <paramref name="c"/>, in the low bits.</summary>
    private ulong ExtractLocked(long c, int n)
    {
        var bits = _levels[0];
        var w = c >> 6;
        var s = (int)(c & 63);
        var v = bits[w] >> s;
        if (s != 0 && w + 1 < bits.Length)
        {
            v |= bits[w + 1] << (64 - s);
        }
        return n == 64 ? v : v & ((1UL << n) - 1);
    }

    /// <summary>Replaces <paramref name="n"/> (1..64) bits at chunk <paramref name="c"/>; keeps the count. Summary levels are left to the caller.</summary>
    private bool InsertLocked(long c, int n, ulong v)
    {
        var bits = _levels[0];
        var w = c >> 6;
        var s = (int)(c & 63);
        var valueMask = n == 64 ? ulong.MaxValue : (1UL << n) - 1;
        v &= valueMask;
        var changed = false;
        // Low part, in word w.
        var lowMask = valueMask << s;
        changed |= ReplaceBits(bits, w, lowMask, v << s);
        // High part, in word w + 1.
        if (s != 0 && n > 64 - s)
        {
            var highMask = valueMask >> (64 - s);
            changed |= ReplaceBits(bits, w + 1, highMask, v >> (64 - s));
        }
        return changed;
    }

    private bool ReplaceBits(ulong[] bits, long w, ulong mask, ulong value)
    {
        var old = bits[w];
        var neu = (old & ~mask) | (value & mask);
        if (neu == old)
        {
            return false;
        }
        _count += BitOperations.PopCount(neu & ~old) - BitOperations.PopCount(old & ~neu);
        bits[w] = neu;
        return true;
    }

    // ------------------------------------------------------------------ hashing

    /// <summary>
    /// SHA-256 of level 0 as little-endian 64-bit words, every word including the partly used last one
    /// (bits past the end are zero), in lowercase hex: QSD's x-debug-block-dirty-bitmap-sha256.
    /// </summary>
    public string Sha256()
    {
        lock (_lock)
        {
            var words = _levels[0];
            byte[] hash;
            if (BitConverter.IsLittleEndian)
            {
                hash = SHA256.HashData(MemoryMarshal.AsBytes(words.AsSpan()));
            }
            else
            {
                using var h = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
                Span<byte> b = stackalloc byte[8];
                foreach (var w in words)
                {
                    BinaryPrimitives.WriteUInt64LittleEndian(b, w);
                    h.AppendData(b);
                }
                hash = h.GetHashAndReset();
            }
            return Convert.ToHexStringLower(hash);
        }
    }

    // ------------------------------------------------------------------ meta bitmap

    /// <summary>
    /// Creates a meta bitmap that records which parts of this bitmap changed: one meta bit per
    /// <paramref name="bitmapBytesPerMetaBit"/> bytes of serialized bitmap data (QEMU's
    /// bdrv_create_meta_dirty_bitmap). It covers the same byte range as this bitmap with a granularity
    /// of Granularity × 8 × <paramref name="bitmapBytesPerMetaBit"/>, so its dirty extents are the
    /// ranges to pass to <see cref="Serialize(long, long)"/>. Every call that changes a bit of this bitmap
    /// marks the meta bits over the range it was asked to change (a superset of the bits that changed).
    /// The consumer resets meta bits once it has read or stored the data.
    /// </summary>
    public HBitmap CreateMeta(int bitmapBytesPerMetaBit)
    {
        if (bitmapBytesPerMetaBit <= 0 || !BitOperations.IsPow2(bitmapBytesPerMetaBit))
        {
            throw new ArgumentOutOfRangeException(nameof(bitmapBytesPerMetaBit), "must be a power of two");
        }
        lock (_lock)
        {
            if (_meta is not null)
            {
                throw new InvalidOperationException("the bitmap already has a meta bitmap");
            }
            var shift = _shift + 3 + BitOperations.Log2((uint)bitmapBytesPerMetaBit);
            _meta = new HBitmap(_size, Math.Min(shift, MaxGranularityShift));
            return _meta;
        }
    }

    /// <summary>Drops the meta bitmap.</summary>
    public void ReleaseMeta()
    {
        lock (_lock)
        {
            _meta = null;
        }
    }

    private void MarkMetaLocked(long firstChunk, long lastChunk)
    {
        var meta = _meta;
        if (meta is null || _size == 0)
        {
            return;
        }
        var start = firstChunk << _shift;
        var end = Math.Min(_size, (lastChunk + 1) << _shift);
        if (end > start)
        {
            meta.Set(start, end - start);
        }
    }

    // ------------------------------------------------------------------ helpers

    private static long ChunksFor(long size, int shift)
    {
        var chunks = size == 0 ? 0 : ((size - 1) >> shift) + 1;
        chunks = Math.Max(chunks, 1);
        if ((chunks + 63) >> 6 > Array.MaxLength)
        {
            throw new ArgumentOutOfRangeException(nameof(size), $"a bitmap of {chunks} bits is too large");
        }
        return chunks;
    }

    private static ulong[][] Allocate(long chunks)
    {
        var levels = new List<ulong[]>();
        var n = (chunks + 63) >> 6;
        levels.Add(new ulong[n]);
        while (n > TopLevelWords)
        {
            n = (n + 63) >> 6;
            levels.Add(new ulong[n]);
        }
        return [.. levels];
    }

    /// <summary>Bits lo..hi (inclusive) of a word.</summary>
    private static ulong Mask(int lo, int hi) => (ulong.MaxValue << lo) & (ulong.MaxValue >> (63 - hi));

    /// <summary>Sets bits [a, b] of an array; returns how many were clear before.</summary>
    private static long SetBits(ulong[] words, long a, long b)
    {
        long wa = a >> 6, wb = b >> 6;
        if (wa == wb)
        {
            return Or(ref words[wa], Mask((int)(a & 63), (int)(b & 63)));
        }
        var added = Or(ref words[wa], ulong.MaxValue << (int)(a & 63));
        for (var w = wa + 1; w < wb; w++)
        {
            added += 64 - BitOperations.PopCount(words[w]);
            words[w] = ulong.MaxValue;
        }
        return added + Or(ref words[wb], ulong.MaxValue >> (63 - (int)(b & 63)));
    }

    /// <summary>Clears bits [a, b] of an array; returns how many were set before.</summary>
    private static long ClearBits(ulong[] words, long a, long b)
    {
        long wa = a >> 6, wb = b >> 6;
        if (wa == wb)
        {
            return AndNot(ref words[wa], Mask((int)(a & 63), (int)(b & 63)));
        }
        var removed = AndNot(ref words[wa], ulong.MaxValue << (int)(a & 63));
        for (var w = wa + 1; w < wb; w++)
        {
            removed += BitOperations.PopCount(words[w]);
            words[w] = 0;
        }
        return removed + AndNot(ref words[wb], ulong.MaxValue >> (63 - (int)(b & 63)));
    }

    private static int Or(ref ulong word, ulong mask)
    {
        var fresh = mask & ~word;
        word |= mask;
        return BitOperations.PopCount(fresh);
    }

    private static int AndNot(ref ulong word, ulong mask)
    {
        var gone = mask & word;
        word &= ~mask;
        return BitOperations.PopCount(gone);
    }

    private (long First, long Last) ChunkRange(long offset, long length)
    {
        if (offset < 0 || length < 0 || offset > _size || length > _size - offset)
        {
            throw new ArgumentOutOfRangeException(nameof(length), $"[{offset}, +{length}) is outside the bitmap of size {_size}");
        }
        return (offset >> _shift, (offset + length - 1) >> _shift);
    }

    private void CheckOffset(long offset)
    {
        if (offset < 0 || offset > Size)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), offset, "outside the bitmap");
        }
    }

    /// <summary>End of <c>[offset, offset + limit)</c> clipped to the size.</summary>
    private long RangeEnd(long offset, long limit)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        ArgumentOutOfRangeException.ThrowIfNegative(limit);
        var size = _size;
        if (offset >= size)
        {
            return offset;
        }
        return limit >= size - offset ? size : offset + limit;
    }
}
