using System.Buffers.Binary;
using System.Numerics;
using System.Text;
using Backup.Block.Bitmaps;

namespace Backup.Block.Drivers.Qcow2;

// Crash-consistent bitmaps: our extension to QEMU's persistent bitmaps (Qcow2Node.Bitmaps.cs).
//
// QEMU flags a stored bitmap in_use while the image is open and distrusts it after a crash. A
// crash-consistent bitmap is stored in the same format and is flagged in_use the same way, but while the
// image is open its data clusters only ever gain bits, and a region's bits are on disk before any write
// into that region reaches the driver (CrashConsistentTracker). Found in_use after a crash, such a bitmap
// is therefore a superset of the disk's changes and loads as consistent.
//
// Which bitmaps are crash-consistent is recorded in a header extension of our own, which QEMU keeps
// without reading. It is trusted only while our autoclear bit is set: QEMU clears autoclear bits it does
// not know when it opens the image read-write, and QEMU does not keep our promise, so after a QEMU session
// an in_use bitmap is inconsistent again, as QEMU itself would say.
//
// Order on disk: the bitmap's entry (in_use, every data cluster allocated, its current bits) is durable
// before the extension names it; a crash in between leaves a bitmap QEMU's rules call inconsistent.
public sealed partial class Qcow2Node : ICrashConsistentBitmapStore
{
    /// <summary>Header extension naming the crash-consistent bitmaps ("bkcc").</summary>
    internal const uint CrashConsistentExtension = 0x626b6363;

    /// <summary>Autoclear bit: the crash-consistent extension describes the bitmaps as they are.</summary>
    internal const ulong AutoclearCrashConsistent = 1UL << 63;

    /// <summary>Regions are at least this large, so that a burst of writes costs few journal updates.</summary>
    private const long MinCrashRegion = 1 << 20;

    /// <summary>The bitmaps kept crash-consistent, by name, with their region size.</summary>
    private readonly Dictionary<string, long> _crashRegions = new(StringComparer.Ordinal);

    private readonly Dictionary<string, CrashConsistentTracker> _crashTrackers = new(StringComparer.Ordinal);

    /// <summary>
    /// The bitmaps the header names as crash-consistent, when our autoclear bit says the list is current;
    /// otherwise none.
    /// </summary>
    private Dictionary<string, long> ReadCrashConsistentNames()
    {
        var names = new Dictionary<string, long>(StringComparer.Ordinal);
        var h = _headerCluster.Header;
        var raw = _headerCluster.Extensions.FirstOrDefault(e => e.Type == CrashConsistentExtension);
        if (raw.Data is null || (h.AutoclearFeatures & AutoclearCrashConsistent) == 0)
        {
            return names;
        }
        var data = raw.Data.AsSpan();
        if (data.Length < 8 || BinaryPrimitives.ReadUInt32BigEndian(data) != 1)
        {
            return names;
        }
        var count = BinaryPrimitives.ReadUInt32BigEndian(data[4..]);
        var pos = 8;
        for (var i = 0; i < count; i++)
        {
            if (pos + 4 > data.Length)
            {
                return [];
            }
            var nameSize = BinaryPrimitives.ReadUInt16BigEndian(data[pos..]);
            var regionBits = data[pos + 2];
            pos += 4;
            if (pos + nameSize > data.Length || regionBits is < 9 or > 62)
            {
                return [];
            }
            names[Encoding.UTF8.GetString(data.Slice(pos, nameSize))] = 1L << regionBits;
            pos += nameSize;
        }
        return names;
    }

    /// <summary>True when a bitmap found in_use may be trusted: it was kept crash-consistent.</summary>
    private static bool IsCrashConsistent(Dictionary<string, long> crash, Qcow2BitmapDirectoryEntry entry) =>
        crash.TryGetValue(entry.Name, out var region) && region >= 8L << entry.GranularityBits;

    /// <summary>Writes our extension for <see cref="_crashRegions"/> (or drops it) and sets our autoclear bit to match.</summary>
    private async ValueTask WriteCrashConsistentHeaderLockedAsync(CancellationToken cancellationToken)
    {
        var extensions = _headerCluster.Extensions.Where(e => e.Type != CrashConsistentExtension).ToList();
        var h = _headerCluster.Header;
        var autoclear = h.AutoclearFeatures & ~AutoclearCrashConsistent;
        if (_crashRegions.Count > 0)
        {
            var size = 8 + _crashRegions.Keys.Sum(n => 4 + Encoding.UTF8.GetByteCount(n));
            var data = new byte[size];
            BinaryPrimitives.WriteUInt32BigEndian(data, 1);
            BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(4), (uint)_crashRegions.Count);
            var pos = 8;
            foreach (var (name, region) in _crashRegions)
            {
                var bytes = Encoding.UTF8.GetBytes(name);
                BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(pos), (ushort)bytes.Length);
                data[pos + 2] = (byte)BitOperations.Log2((ulong)region);
                bytes.CopyTo(data, pos + 4);
                pos += 4 + bytes.Length;
            }
            extensions.Add(new Qcow2HeaderExtension(CrashConsistentExtension, data));
            autoclear |= AutoclearCrashConsistent;
        }
        if (autoclear == h.AutoclearFeatures && extensions.Count == _headerCluster.Extensions.Count && _crashRegions.Count == 0)
        {
            return;
        }
        var previous = _headerCluster;
        _headerCluster = previous with { Extensions = extensions };
        try
        {
            await RewriteHeaderAsync(h with { AutoclearFeatures = autoclear }, cancellationToken).ConfigureAwait(false);
            await _file.FlushAsync(cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            _headerCluster = previous;
            throw;
        }
    }

    // ------------------------------------------------------------------ ICrashConsistentBitmapStore

    public void CheckCanKeepCrashConsistent(string name)
    {
        if (ReadOnly || Header.Version < 3)
        {
            throw new BlockException($"Can't make bitmap '{name}' crash-consistent in '{NodeName}': " +
                (ReadOnly ? "the node is read-only" : "Cannot store dirty bitmaps in qcow2 v2 files"));
        }
    }

    public async ValueTask KeepCrashConsistentAsync(DirtyBitmap bitmap, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        CheckCanKeepCrashConsistent(bitmap.Name!);
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await KeepCrashConsistentLockedAsync(bitmap, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _meta.Release();
        }
    }

    /// <summary>
    /// Stores the bitmap in use with every data cluster allocated, names it in our extension, and from
    /// then on journals each new region before writes into it reach the driver. Callers make sure no
    /// write is in flight (open, or a drained node), so none can slip between the store and the tracker.
    /// </summary>
    private async ValueTask KeepCrashConsistentLockedAsync(DirtyBitmap bitmap, CancellationToken cancellationToken)
    {
        var name = bitmap.Name!;
        // A bitmap of this name journaled before (its add was undone) stops writing into the clusters
        // this store is about to free.
        await StopCrashConsistencyAsync(name, forget: false).ConfigureAwait(false);
        var (entry, dataClusters) = await WriteJournalBitmapAsync(bitmap, cancellationToken).ConfigureAwait(false);
        var entries = new List<Qcow2BitmapDirectoryEntry>();
        var freed = new List<long>();
        var replaced = false;
        foreach (var old in _bitmapDirectory)
        {
            if (old.Name == name)
            {
                entries.Add(entry);
                freed.AddRange(await ClustersOfAsync(old, cancellationToken).ConfigureAwait(false));
                replaced = true;
            }
            else
            {
                entries.Add(old);
            }
        }
        if (!replaced)
        {
            entries.Add(entry);
        }
        await CommitDirectoryAsync(entries, freed, cancellationToken).ConfigureAwait(false);

        var region = Math.Max(MinCrashRegion, 8 * bitmap.Granularity);
        _crashRegions[name] = region;
        await WriteCrashConsistentHeaderLockedAsync(cancellationToken).ConfigureAwait(false);

        var tracker = new CrashConsistentTracker(bitmap, new Qcow2CrashJournal(_file, _clusterSize, bitmap.Granularity,
            bitmap.Size, region, dataClusters));
        _crashTrackers[name] = tracker;
        bitmap.CrashTracker = tracker;
        AddWriteObserver(tracker);
    }

    /// <summary>Stores the bitmap in use with every data cluster allocated, zeros or not: the journal writes into them in place.</summary>
    private async ValueTask<(Qcow2BitmapDirectoryEntry Entry, long[] DataClusters)> WriteJournalBitmapAsync(DirtyBitmap bitmap,
        CancellationToken cancellationToken)
    {
        var dataClusters = new long[Qcow2BitmapDirectoryEntry.TableSizeFor(_virtualSize, bitmap.Granularity, _clusterSize)];
        var entry = await WriteBitmapDataAsync(bitmap, inUse: true, cancellationToken, dataClusters).ConfigureAwait(false);
        return (entry, dataClusters);
    }

    /// <summary>At read-write open: resumes journaling for the crash-consistent bitmaps just loaded.</summary>
    private async ValueTask ResumeCrashConsistencyAsync(Dictionary<string, long> crash, CancellationToken cancellationToken)
    {
        if (ReadOnly || (crash.Count == 0 && !_headerCluster.Extensions.Any(e => e.Type == CrashConsistentExtension)))
        {
            return;
        }
        var set = this.GetDirtyBitmaps();
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            foreach (var name in crash.Keys)
            {
                if (set.Find(name) is { Persistent: true, Inconsistent: false } bitmap)
                {
                    await KeepCrashConsistentLockedAsync(bitmap, cancellationToken).ConfigureAwait(false);
                }
            }
            // Drops names of bitmaps that are gone, or a list another program left stale.
            await WriteCrashConsistentHeaderLockedAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _meta.Release();
        }
    }

    /// <summary>Stops journaling one bitmap (removed, or the node closes) and waits for an update in progress.</summary>
    private async ValueTask StopCrashConsistencyAsync(string name, bool forget)
    {
        if (_crashTrackers.Remove(name, out var tracker))
        {
            await tracker.DetachAsync().ConfigureAwait(false);
            tracker.Bitmap.CrashTracker = null;
        }
        if (forget)
        {
            _crashRegions.Remove(name);
        }
    }

    /// <summary>Before the bitmaps are stored at close: no journal update may write into clusters the store frees.</summary>
    private async ValueTask StopAllCrashConsistencyAsync()
    {
        // Still crash-consistent at the next open: the node's own bitmaps that are journaled now (not
        // one whose add was undone, nor a plain bitmap that took its name since).
        var set = this.TryGetDirtyBitmaps();
        foreach (var name in _crashRegions.Keys.ToList())
        {
            if (!(_crashTrackers.TryGetValue(name, out var tracker) && set?.Find(name) is { Persistent: true, Inconsistent: false } b &&
                ReferenceEquals(b, tracker.Bitmap)))
            {
                _crashRegions.Remove(name);
            }
        }
        foreach (var name in _crashTrackers.Keys.ToList())
        {
            await StopCrashConsistencyAsync(name, forget: false).ConfigureAwait(false);
        }
    }
}

/// <summary>
/// The journal of one crash-consistent qcow2 bitmap: sets a region's bits in the bitmap's own data
/// clusters (allocated up front, so no metadata changes) and flushes. Data clusters are cached once read.
/// </summary>
internal sealed class Qcow2CrashJournal(BlockNode file, int clusterSize, long granularity, long size, long regionSize,
    long[] dataClusters) : ICrashJournal
{
    private const int Sector = 512;
    private readonly byte[]?[] _clusters = new byte[dataClusters.Length][];
    private readonly long _bitsPerCluster = (long)clusterSize * 8;

    public long RegionSize => regionSize;

    public async ValueTask PersistAsync(IReadOnlyList<long> regions, CancellationToken cancellationToken)
    {
        // Dirty sector span per data cluster touched.
        var spans = new Dictionary<int, (int Lo, int Hi)>();
        var granules = (size + granularity - 1) / granularity;
        foreach (var r in regions)
        {
            var first = r * regionSize / granularity;
            var end = Math.Min((r + 1) * regionSize / granularity, granules);
            for (var bit = first; bit < end;)
            {
                var index = (int)(bit / _bitsPerCluster);
                var cluster = _clusters[index] ??= await ReadClusterAsync(index, cancellationToken).ConfigureAwait(false);
                var clusterEnd = Math.Min(end, (index + 1) * _bitsPerCluster);
                var lo = (int)(bit % _bitsPerCluster);
                var hi = (int)(clusterEnd - (long)index * _bitsPerCluster);
                SetBits(cluster, lo, hi);
                var (sLo, sHi) = (lo / 8 / Sector * Sector, ((hi + 7) / 8 + Sector - 1) / Sector * Sector);
                spans[index] = spans.TryGetValue(index, out var s) ? (Math.Min(s.Lo, sLo), Math.Max(s.Hi, sHi)) : (sLo, sHi);
                bit = clusterEnd;
            }
        }
        foreach (var (index, (lo, hi)) in spans)
        {
            await file.WriteAsync(dataClusters[index] + lo, _clusters[index].AsMemory(lo, Math.Min(hi, clusterSize) - lo),
                WriteFlags.None, cancellationToken).ConfigureAwait(false);
        }
        await file.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask<byte[]> ReadClusterAsync(int index, CancellationToken cancellationToken)
    {
        var buffer = new byte[clusterSize];
        await file.ReadAsync(dataClusters[index], buffer, cancellationToken).ConfigureAwait(false);
        return buffer;
    }

    /// <summary>QEMU's serialization: bit i of the bitmap is bit (i % 8) of byte i / 8.</summary>
    private static void SetBits(byte[] cluster, int lo, int hi)
    {
        while (lo < hi && (lo & 7) != 0)
        {
            cluster[lo >> 3] |= (byte)(1 << (lo & 7));
            lo++;
        }
        var fullBytes = (hi - lo) / 8;
        cluster.AsSpan(lo >> 3, fullBytes).Fill(0xff);
        lo += fullBytes * 8;
        while (lo < hi)
        {
            cluster[lo >> 3] |= (byte)(1 << (lo & 7));
            lo++;
        }
    }
}
