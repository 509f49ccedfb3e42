using System.Buffers;
using System.Buffers.Binary;

namespace Backup.Block.Drivers.Qcow2;

/// <summary>
/// A qcow2 image (QEMU docs/interop/qcow2.txt, versions 2 and 3) on top of its file child, with an
/// optional backing node that unallocated clusters read through to.
/// </summary>
/// <remarks>
/// <para><b>Locking.</b> One async metadata lock (<see cref="_meta"/>) serialises every change to L1,
/// L2 and refcount metadata, cluster allocation and the loading of tables into the caches. Reads and
/// writes that only touch clusters that are already allocated to this image with refcount 1 (the
/// COPIED flag) look their L2 entry up without the lock and do their data I/O concurrently. Anything
/// else (allocation, copy-on-write, zero clusters, compressed clusters) runs under the lock, which
/// re-checks the entry first, so two writes racing for the same unallocated cluster allocate it once.</para>
/// <para><b>Crash safety.</b> Metadata is written through (the caches never hold unwritten state) in an
/// order such that a crash at any point leaks clusters at worst:
/// <list type="bullet">
/// <item>Clusters are handed out from a reserve whose refcounts were raised with durable (FUA) writes
/// first, so a refcount is always stable before any L2 or L1 entry points at its cluster.</item>
/// <item>Data is written before the L2 entry that points at it; a new L2 table is written durably
/// before the L1 entry that points at it (a power loss must not leave L1 pointing at garbage).</item>
/// <item>Refcounts of clusters that lost their last reference are lowered only after a flush made the
/// dropped reference durable (<see cref="_pendingFrees"/>), and only when no lock-free request that
/// may still be using the old mapping is in flight.</item>
/// </list></para>
/// <para><b>External data file</b> (incompatible bit 2): guest data lives in a second node at the
/// guest offset (qcow2.txt: host offset == guest offset, data clusters are not refcounted, an entry with
/// offset 0 and COPIED maps guest cluster 0); only metadata stays in the image file. With the autoclear
/// bit <c>data-file-raw</c> the data file must stay a plain raw image on its own, so zeroing and
/// discarding go to the data file and every cluster stays mapped.</para>
/// <para><b>Lazy refcounts</b> are accepted but refcounts are always kept exact; the reserve makes that
/// cheap, and the dirty bit is never set. Images found dirty open read-only only.</para>
/// </remarks>
public sealed partial class Qcow2Node : BlockNode
{
    private readonly BlockNode _file;
    private readonly BlockNode? _backing;
    /// <summary>Where guest data clusters are: the external data file, or the image file itself.</summary>
    private readonly BlockNode _data;
    private readonly bool _hasDataFile;
    private readonly bool _dataFileRaw;
    private readonly SemaphoreSlim _meta = new(1, 1);
    private readonly Qcow2MetadataCache<ulong[]> _l2Cache;
    private readonly Qcow2MetadataCache<byte[]> _refCache;

    private readonly int _clusterBits;
    private readonly int _clusterSize;
    private readonly int _l2Bits;
    private readonly int _l2Entries;
    private readonly int _refcountOrder;
    private readonly int _refBlockEntries;
    private readonly ulong _refcountMax;
    /// <summary>The active L1 table; replaced (never resized in place) when block_resize grows it.</summary>
    private ulong[] _l1;
    private long _l1Offset;
    private long _virtualSize;

    private Qcow2HeaderCluster _headerCluster;
    private ulong[] _refTable;
    private long _refTableOffset;
    private bool _closed;

    /// <summary>Lock-free requests in flight, by epoch parity; see <see cref="DrainLockFreeRequestsAsync"/>.</summary>
    private readonly int[] _lockFreeInFlight = new int[2];
    private int _epoch;

    private Qcow2Node(NodeContext context, BlockNode file, BlockNode? backing, BlockNode? dataFile, Qcow2HeaderCluster headerCluster,
        ulong[] l1, ulong[] refTable, Qcow2CacheSizes cacheSizes) : base(context)
    {
        _file = file;
        _backing = backing;
        _data = dataFile ?? file;
        _hasDataFile = dataFile is not null;
        _dataFileRaw = dataFile is not null && (headerCluster.Header.AutoclearFeatures & Qcow2Header.AutoclearDataFileRaw) != 0;
        _headerCluster = headerCluster;
        var h = headerCluster.Header;
        _clusterBits = h.ClusterBits;
        _clusterSize = h.ClusterSize;
        _l2Bits = _clusterBits - 3;
        _l2Entries = _clusterSize / 8;
        _refcountOrder = h.RefcountOrder;
        _refBlockEntries = (int)((long)_clusterSize * 8 >> _refcountOrder);
        _refcountMax = _refcountOrder == 6 ? ulong.MaxValue : (1UL << (1 << _refcountOrder)) - 1;
        _l1 = l1;
        _l1Offset = (long)h.L1TableOffset;
        _refTable = refTable;
        _refTableOffset = (long)h.RefcountTableOffset;
        _virtualSize = (long)h.Size;
        _l2Cache = new Qcow2MetadataCache<ulong[]>((int)Math.Max(1, cacheSizes.L2Bytes / _clusterSize));
        _refCache = new Qcow2MetadataCache<byte[]>((int)Math.Max(1, cacheSizes.RefcountBytes / _clusterSize));
        ReserveBatch = Math.Clamp((32 << 20) / _clusterSize, 16, 8192);
        _freeHint = 0;
        var children = new List<BlockChild> { new("file", file) };
        if (backing is not null)
        {
            children.Add(new BlockChild("backing", backing));
        }
        if (dataFile is not null)
        {
            children.Add(new BlockChild("data-file", dataFile));
        }
        Children = children;
    }

    public override string DriverName => "qcow2";

    public override string Filename => _file.Filename;

    public override long Length => Volatile.Read(ref _virtualSize);

    public override IReadOnlyList<BlockChild> Children { get; }

    public BlockNode File => _file;

    public BlockNode? Backing => _backing;

    /// <summary>The external data file, if the image has one.</summary>
    public BlockNode? DataFile => _hasDataFile ? _data : null;

    public int ClusterSize => _clusterSize;

    internal int L2CacheCapacity => _l2Cache.Capacity;

    internal int RefcountCacheCapacity => _refCache.Capacity;

    internal Qcow2Header Header => _headerCluster.Header;

    /// <summary>
    /// Reads the image metadata the node keeps in memory (L1 and refcount tables), validates what the
    /// header says, when writable clears the autoclear bits we do not maintain, and loads the stored bitmaps.
    /// </summary>
    internal static async ValueTask<Qcow2Node> OpenAsync(NodeContext context, BlockNode file, BlockNode? backing,
        BlockNode? dataFile, Qcow2HeaderCluster headerCluster, Qcow2CacheSizes cacheSizes, CancellationToken cancellationToken)
    {
        var h = headerCluster.Header;
        var cs = h.ClusterSize;
        if (h.L1TableOffset % (ulong)cs != 0)
        {
            throw new BlockException("qcow2: Invalid L1 table offset");
        }
        if (h.RefcountTableOffset % (ulong)cs != 0 || h.RefcountTableOffset == 0)
        {
            throw new BlockException("qcow2: Invalid reference count table offset");
        }
        // QEMU's limits: 32 MiB of L1 table, 8 MiB of refcount table.
        if ((long)h.L1Size * 8 > 32L << 20)
        {
            throw new BlockException("Active L1 table too large");
        }
        if ((long)h.RefcountTableClusters * cs > 8L << 20)
        {
            throw new BlockException("Reference count table too large");
        }
        var l2Coverage = (long)cs * (cs / 8);
        var l1Needed = (long)((h.Size + (ulong)l2Coverage - 1) / (ulong)l2Coverage);
        if (h.L1Size < l1Needed)
        {
            throw new BlockException("L1 table is too small");
        }
        var l1 = await ReadTableAsync(file, (long)h.L1TableOffset, (int)h.L1Size, cancellationToken).ConfigureAwait(false);
        var refTable = await ReadTableAsync(file, (long)h.RefcountTableOffset, (int)(h.RefcountTableClusters * (uint)cs / 8),
            cancellationToken).ConfigureAwait(false);
        var node = new Qcow2Node(context, file, backing, dataFile, headerCluster, l1, refTable, cacheSizes);
        if (!context.ReadOnly && h.Version >= 3 && (h.AutoclearFeatures & ~KnownAutoclearFeatures) != 0)
        {
            // qcow2.txt: a writer must clear the auto-clear bits it does not understand before writing.
            await node.RewriteHeaderAsync(h with { AutoclearFeatures = h.AutoclearFeatures & KnownAutoclearFeatures },
                cancellationToken).ConfigureAwait(false);
        }
        await node.LoadBitmapsAsync(cancellationToken).ConfigureAwait(false);
        return node;
    }

    /// <summary>
    /// Autoclear features whose data this driver keeps consistent while writing: bitmaps
    /// (Qcow2Node.Bitmaps.cs), data-file-raw (every write and zeroing reaches the data file at the guest
    /// offset) and our crash-consistent bitmap list (Qcow2Node.CrashConsistent.cs).
    /// </summary>
    internal const ulong KnownAutoclearFeatures = Qcow2Header.AutoclearBitmaps | Qcow2Header.AutoclearDataFileRaw | AutoclearCrashConsistent;

    private static async ValueTask<ulong[]> ReadTableAsync(BlockNode file, long offset, int entries, CancellationToken cancellationToken)
    {
        var table = new ulong[entries];
        if (entries == 0)
        {
            return table;
        }
        var bytes = ArrayPool<byte>.Shared.Rent(entries * 8);
        try
        {
            await ReadFileAsync(file, offset, bytes.AsMemory(0, entries * 8), cancellationToken).ConfigureAwait(false);
            for (var i = 0; i < entries; i++)
            {
                table[i] = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(i * 8));
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(bytes);
        }
        return table;
    }

    /// <summary>Reads from the file child; bytes past its end read as zeros even when the child cannot grow.</summary>
    private static async ValueTask ReadFileAsync(BlockNode file, long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        var available = Math.Clamp(file.Length - offset, 0, buffer.Length);
        if (available > 0)
        {
            await file.ReadAsync(offset, buffer[..(int)available], cancellationToken).ConfigureAwait(false);
        }
        buffer.Span[(int)available..].Clear();
    }

    /// <summary>Writes the whole header cluster content (header, every extension, backing name) back.</summary>
    private async ValueTask RewriteHeaderAsync(Qcow2Header header, CancellationToken cancellationToken)
    {
        var updated = _headerCluster with { Header = header };
        var size = updated.Size;
        var buffer = ArrayPool<byte>.Shared.Rent(size);
        try
        {
            var written = updated.WriteTo(buffer);
            await _file.WriteAsync(0, buffer.AsMemory(0, size), WriteFlags.None, cancellationToken).ConfigureAwait(false);
            _headerCluster = updated with { Header = written };
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>A stored bitmap's flags as QSD's format-specific info names them, in its order.</summary>
    private static string[] BitmapFlagNames(Qcow2BitmapDirectoryEntry e) => (e.InUse, e.Auto) switch
    {
        (true, true) => ["in-use", "auto"],
        (true, false) => ["in-use"],
        (false, true) => ["auto"],
        _ => [],
    };

    public override ImageInfo GetImageInfo()
    {
        var h = _headerCluster.Header;
        var backingName = _headerCluster.BackingFileName;
        var data = new List<KeyValuePair<string, object?>>
        {
            new("compat", h.Version >= 3 ? "1.1" : "0.10"),
            // QSD reports the compression type for v2 images too (zlib is the only one they can have).
            new("compression-type", h.CompressionType == 1 ? "zstd" : "zlib"),
        };
        if (h.Version >= 3)
        {
            data.Add(new("lazy-refcounts", (h.CompatibleFeatures & Qcow2Header.CompatLazyRefcounts) != 0));
        }
        if (_bitmapDirectory.Count > 0)
        {
            // As stored in the image now (QSD reads the directory): in-use while open read-write.
            data.Add(new("bitmaps", _bitmapDirectory.Select(e => new KeyValuePair<string, object?>[]
            {
                new("flags", BitmapFlagNames(e)),
                new("name", e.Name),
                new("granularity", e.Granularity),
            }).ToArray()));
        }
        data.Add(new("refcount-bits", 1 << h.RefcountOrder));
        if (_hasDataFile)
        {
            if (_headerCluster.DataFileName is { } dataFileName)
            {
                data.Add(new("data-file", dataFileName));
            }
            data.Add(new("data-file-raw", _dataFileRaw));
        }
        if (h.Version >= 3)
        {
            data.Add(new("corrupt", (h.IncompatibleFeatures & Qcow2Header.IncompatCorrupt) != 0));
            data.Add(new("extended-l2", (h.IncompatibleFeatures & Qcow2Header.IncompatExtendedL2) != 0));
        }
        return new ImageInfo
        {
            Filename = Filename,
            Format = "qcow2",
            VirtualSize = _virtualSize,
            ActualSize = _file.GetImageInfo().ActualSize,
            DirtyFlag = (h.IncompatibleFeatures & Qcow2Header.IncompatDirty) != 0,
            ClusterSize = _clusterSize,
            BackingFilename = backingName,
            FullBackingFilename = backingName is null ? null : Qcow2Driver.ResolveBackingPath(Filename, backingName),
            BackingFilenameFormat = backingName is null ? null : _headerCluster.BackingFormat,
            BackingImage = _backing?.GetImageInfo(),
            FormatSpecific = new FormatSpecificInfo("qcow2", data),
        };
    }

    public override async ValueTask CloseAsync()
    {
        if (_closed)
        {
            return;
        }
        _closed = true;
        try
        {
            if (!ReadOnly)
            {
                await CloseWritableAsync().ConfigureAwait(false);
            }
        }
        finally
        {
            _meta.Dispose();
        }
    }

    /// <summary>
    /// Stores bitmaps and gives back the reserve, in the crash-safe order of each step. The first step
    /// that fails ends the close there: the image is then as a crash at that point would leave it (at
    /// worst leaked clusters), while going on from in-memory state the disk no longer matches could not
    /// promise that.
    /// </summary>
    private async ValueTask CloseWritableAsync()
    {
        await StopAllCrashConsistencyAsync().ConfigureAwait(false);
        await _meta.WaitAsync().ConfigureAwait(false);
        try
        {
            await StoreBitmapsOnCloseLockedAsync(CancellationToken.None).ConfigureAwait(false);
            await WriteCrashConsistentHeaderLockedAsync(CancellationToken.None).ConfigureAwait(false);
            // Give back what the reserve holds and what discards freed, so a clean close leaks nothing.
            await ProcessPendingFreesAsync(CancellationToken.None).ConfigureAwait(false);
            await ReleaseReserveAsync(CancellationToken.None).ConfigureAwait(false);
            if (_hasDataFile)
            {
                await _data.FlushAsync().ConfigureAwait(false);
            }
            await _file.FlushAsync().ConfigureAwait(false);
        }
        finally
        {
            _meta.Release();
        }
    }

    // ------------------------------------------------------------------ lock-free request tracking

    /// <summary>Marks a request that uses L2 mappings without holding the metadata lock.</summary>
    private int EnterLockFree()
    {
        while (true)
        {
            var parity = Volatile.Read(ref _epoch) & 1;
            Interlocked.Increment(ref _lockFreeInFlight[parity]);
            if ((Volatile.Read(ref _epoch) & 1) == parity)
            {
                return parity;
            }
            Interlocked.Decrement(ref _lockFreeInFlight[parity]);
        }
    }

    private void ExitLockFree(int parity) => Interlocked.Decrement(ref _lockFreeInFlight[parity]);

    /// <summary>
    /// Waits until every lock-free request that started before now has finished. Called under the
    /// metadata lock before freed clusters become reusable, so that a request that looked up a mapping
    /// before it was dropped can never read or write a cluster that has been handed to someone else.
    /// </summary>
    private async ValueTask DrainLockFreeRequestsAsync(CancellationToken cancellationToken)
    {
        var old = Interlocked.Increment(ref _epoch) - 1 & 1;
        while (Volatile.Read(ref _lockFreeInFlight[old]) != 0)
        {
            await Task.Delay(1, cancellationToken).ConfigureAwait(false);
        }
    }
}

/// <summary>How many bytes of L2 tables and refcount blocks a node caches.</summary>
internal readonly record struct Qcow2CacheSizes(long L2Bytes, long RefcountBytes);
