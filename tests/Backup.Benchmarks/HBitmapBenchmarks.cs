using Backup.Block.Bitmaps;
using BenchmarkDotNet.Attributes;

namespace Backup.Benchmarks;

/// <summary>
/// The dirty-bitmap targets (docs/performance.md) on a 16 TiB node at 64 KiB granularity (2^28 chunks): next dirty from any
/// offset with one chunk set &lt; 10 µs; set or clear 1 GiB &lt; 50 µs; mark a random 4 KiB write
/// &lt; 100 ns; summary levels at most 1/63 of the flat array (reported by <see cref="GlobalSetup"/>).
/// </summary>
[MemoryDiagnoser]
public class HBitmapBenchmarks
{
    private const long Size = 16L << 40;
    private const int Shift = 16;
    private const int Ops = 1024;

    private HBitmap _sparse = null!;
    private HBitmap _empty = null!;
    private HBitmap _full = null!;
    private HBitmap _scratch = null!;
    private DirtyBitmapSet _set = null!;
    private DirtyBitmap _bitmap = null!;
    private DirtyBitmapSet _fullSet = null!;
    private long[] _offsets = null!;
    private long _target;

    [GlobalSetup]
    public void GlobalSetup()
    {
        _sparse = new HBitmap(Size, Shift);
        // The one dirty chunk sits in the last eighth, far from most start offsets.
        _target = (Size / 8 * 7) + 12345L * 65536;
        _sparse.Set(_target, 4096);
        _empty = new HBitmap(Size, Shift);
        _full = new HBitmap(Size, Shift);
        _full.SetAll();
        _scratch = new HBitmap(Size, Shift);
        var node = new NullNode(Size);
        _set = node.GetDirtyBitmaps();
        _bitmap = _set.Add("b0");
        _fullSet = new NullNode(Size).GetDirtyBitmaps();
        _fullSet.Add("b0").Bits.SetAll();
        var rng = new Random(42);
        _offsets = new long[Ops];
        for (var i = 0; i < Ops; i++)
        {
            _offsets[i] = rng.NextInt64(Size / 4096) * 4096;
        }
        Console.WriteLine($"// memory: flat {_sparse.FlatMemoryBytes} B, total {_sparse.MemoryBytes} B, " +
            $"overhead {(double)(_sparse.MemoryBytes - _sparse.FlatMemoryBytes) / _sparse.FlatMemoryBytes:P4} " +
            $"(limit 1/63 = {1.0 / 63:P4})");
    }

    /// <summary>From a random offset before the only dirty chunk (per call).</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public long NextDirty_OneChunkSet()
    {
        long sum = 0;
        foreach (var o in _offsets)
        {
            sum += _sparse.NextDirty(o / 8 * 7);
        }
        return sum;
    }

    /// <summary>Worst case for the hierarchy: nothing dirty after the offset, search to the end.</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public long NextDirty_Empty()
    {
        long sum = 0;
        foreach (var o in _offsets)
        {
            sum += _empty.NextDirty(o);
        }
        return sum;
    }

    /// <summary>A 1 GiB dirty extent found from a random offset in a full bitmap, limited to 1 GiB.</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public long NextDirtyExtent_1GiB_InFullBitmap()
    {
        long sum = 0;
        foreach (var o in _offsets)
        {
            sum += _full.NextDirtyExtent(o, 1L << 30)!.Value.Length;
        }
        return sum;
    }

    /// <summary>Set then clear the same 1 GiB range (two operations per call).</summary>
    [Benchmark(OperationsPerInvoke = 2)]
    public void SetThenReset_1GiB()
    {
        _scratch.Set(3L << 40, 1L << 30);
        _scratch.Reset(3L << 40, 1L << 30);
    }

    /// <summary>
    /// Random 4 KiB writes into clean chunks (slow path: lock, set, summary levels), each undone by a
    /// reset of the same chunk; the mean is per operation (set or reset).
    /// </summary>
    [Benchmark(OperationsPerInvoke = 2 * Ops)]
    public void SetReset_Random4KiB_Clean()
    {
        foreach (var o in _offsets)
        {
            _scratch.Set(o, 4096);
        }
        foreach (var o in _offsets)
        {
            _scratch.Reset(o, 4096);
        }
    }

    /// <summary>Random 4 KiB writes into dirty chunks (lock-free fast path).</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public void Set_Random4KiB_AlreadyDirty()
    {
        foreach (var o in _offsets)
        {
            _full.Set(o, 4096);
        }
    }

    /// <summary>
    /// The node's write observer path (set lock, then the bitmap) with one recording bitmap into clean
    /// chunks, each undone by a reset; the mean is per operation (mark or reset).
    /// </summary>
    [Benchmark(OperationsPerInvoke = 2 * Ops)]
    public void MarkDirty_Node_Random4KiB_Clean()
    {
        foreach (var o in _offsets)
        {
            _set.MarkDirty(o, 4096);
        }
        var bits = _bitmap.Bits;
        foreach (var o in _offsets)
        {
            bits.Reset(o, 4096);
        }
    }

    /// <summary>The node's write observer path when the chunk is already dirty (lock-free).</summary>
    [Benchmark(OperationsPerInvoke = Ops)]
    public void MarkDirty_Node_Random4KiB_AlreadyDirty()
    {
        foreach (var o in _offsets)
        {
            _fullSet.MarkDirty(o, 4096);
        }
    }
}
