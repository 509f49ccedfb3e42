using System.Buffers.Binary;
using System.Numerics;
using System.Text;
using Backup.Block.Bitmaps;

namespace Backup.Block.Drivers.Qcow2;

// Persistent dirty bitmaps (qcow2.txt "Bitmaps extension"), in QEMU's on-disk format so that images move
// between backupd, qemu-storage-daemon and qemu-img both ways.
//
// Life cycle, as QEMU does it:
// - open: a trusted extension (autoclear bit 0 set) is loaded into the node's DirtyBitmapSet. Read-write,
//   every entry is then flagged in_use on disk (in place, then a flush) before the node takes writes, so
//   a crash leaves them marked. Entries found in_use come back inconsistent (no data, can only be removed).
//   Read-only, bitmaps load read-only and the image is left alone.
// - close (quit, SIGTERM, blockdev-del): every consistent persistent bitmap is written to new clusters, a
//   new directory follows, the header switches to it, and only then are the old clusters freed. A crash
//   at any point leaves either the old or the new set of bitmaps and at worst leaked clusters.
// - block-dirty-bitmap-remove of a stored bitmap rewrites the directory without it at once.
// Bitmap data clusters that are all zeros are not written (table entry 0), as QEMU does.
//
// Everything that touches the image runs under the metadata lock.
public sealed partial class Qcow2Node : IPersistentBitmapStore
{
    /// <summary>The directory as it is on disk now, in on-disk order; empty when the image has no bitmaps.</summary>
    private List<Qcow2BitmapDirectoryEntry> _bitmapDirectory = [];

    /// <summary>The bitmaps extension as it is in the header now; null when there is none.</summary>
    private Qcow2BitmapsExtension? _bitmapsExtension;

    /// <summary>The directory as on disk (for tests and the later crash-consistent store).</summary>
    internal IReadOnlyList<Qcow2BitmapDirectoryEntry> BitmapDirectory => _bitmapDirectory;

    // ------------------------------------------------------------------ open

    /// <summary>Loads the stored bitmaps into the node's bitmap set; read-write, flags them in use on disk.</summary>
    private async ValueTask LoadBitmapsAsync(CancellationToken cancellationToken)
    {
        var h = _headerCluster.Header;
        var raw = _headerCluster.Extensions.FirstOrDefault(e => e.Type == Qcow2HeaderExtension.Bitmaps);
        if (raw.Data is null)
        {
            return;
        }
        if (h.Version < 3 || (h.AutoclearFeatures & Qcow2Header.AutoclearBitmaps) == 0)
        {
            // A program that does not know bitmaps wrote the image since they were stored (it cleared
            // the autoclear bit, as the spec tells it to): the bitmaps may be stale, QEMU drops them.
            if (!ReadOnly)
            {
                await WriteBitmapsHeaderAsync(null, cancellationToken).ConfigureAwait(false);
            }
            return;
        }
        if (!Qcow2BitmapsExtension.TryRead(raw.Data, _clusterSize, out var ext, out var error))
        {
            throw new BlockException(error!);
        }
        var directoryBytes = new byte[ext.DirectorySize];
        await ReadFileAsync(_file, (long)ext.DirectoryOffset, directoryBytes, cancellationToken).ConfigureAwait(false);
        if (!Qcow2BitmapDirectory.TryRead(directoryBytes, ext.NbBitmaps, _virtualSize, _clusterSize, _file.Length,
                out var entries, out error))
        {
            throw new BlockException(error!);
        }

        var set = this.GetDirtyBitmaps();
        var crash = ReadCrashConsistentNames();
        foreach (var e in entries)
        {
            var bitmap = set.Add(e.Name, e.Granularity, persistent: true, disabled: !e.Auto);
            if (e.InUse && !IsCrashConsistent(crash, e))
            {
                // In use on disk: the last writer did not close the image cleanly, the bits are stale.
                bitmap.SetInconsistent();
                continue;
            }
            await ReadBitmapDataAsync(e, bitmap.Bits, cancellationToken).ConfigureAwait(false);
            if (ReadOnly)
            {
                bitmap.SetReadOnly(true);
            }
        }
        _bitmapsExtension = ext;
        _bitmapDirectory = entries;

        if (!ReadOnly && entries.Exists(e => !e.InUse))
        {
            // Only flags change, so the directory keeps its size and is rewritten in place; the flush makes
            // the in_use flags durable before the first guest write can change what the bitmaps describe.
            var marked = entries.ConvertAll(e => e with { Flags = e.Flags | Qcow2BitmapDirectoryEntry.FlagInUse });
            await _file.WriteAsync((long)ext.DirectoryOffset, Qcow2BitmapDirectory.Write(marked), WriteFlags.None,
                cancellationToken).ConfigureAwait(false);
            await _file.FlushAsync(cancellationToken).ConfigureAwait(false);
            _bitmapDirectory = marked;
        }
        await ResumeCrashConsistencyAsync(crash, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Fills <paramref name="bits"/> from the entry's bitmap table and data clusters.</summary>
    private async ValueTask ReadBitmapDataAsync(Qcow2BitmapDirectoryEntry entry, HBitmap bits, CancellationToken cancellationToken)
    {
        var table = await ReadTableAsync(_file, (long)entry.TableOffset, (int)entry.TableSize, cancellationToken).ConfigureAwait(false);
        var covered = BytesPerDataCluster(entry.Granularity);
        var buffer = new byte[_clusterSize];
        for (var i = 0; i < table.Length; i++)
        {
            var t = new Qcow2BitmapTableEntry(table[i]);
            if (!t.IsValid(_clusterSize))
            {
                throw new BlockException($"Bitmap '{entry.Name}' has an invalid bitmap table entry");
            }
            var offset = i * covered;
            if (offset >= bits.Size || t.IsAllZeros)
            {
                continue;
            }
            var length = Math.Min(covered, bits.Size - offset);
            if (t.IsAllOnes)
            {
                bits.Set(offset, length);
                continue;
            }
            await ReadFileAsync(_file, t.Offset, buffer, cancellationToken).ConfigureAwait(false);
            bits.Deserialize(offset, length, buffer.AsSpan(0, (int)bits.SerializationSize(offset, length)));
        }
    }

    /// <summary>Guest bytes one bitmap data cluster describes: cluster_size × 8 bits of one granule each.</summary>
    private long BytesPerDataCluster(long granularity) => (long)_clusterSize * 8 * granularity;

    // ------------------------------------------------------------------ IPersistentBitmapStore

    public void CheckCanStoreNew(string name, long granularity)
    {
        ArgumentNullException.ThrowIfNull(name);
        var nameBytes = Encoding.UTF8.GetByteCount(name);
        var reason = Header.Version < 3
            ? "Cannot store dirty bitmaps in qcow2 v2 files"
            : Qcow2BitmapDirectoryEntry.CheckConstraints(nameBytes, granularity, _virtualSize, _clusterSize);
        if (reason is null)
        {
            // Count what the directory will hold at close: every persistent bitmap plus the new one.
            var persistent = (this.TryGetDirtyBitmaps()?.Bitmaps ?? []).Where(b => b.Persistent && b.Name is not null).ToList();
            var count = persistent.Count + 1;
            var size = persistent.Sum(b => (long)Qcow2BitmapDirectoryEntry.SizeFor(Encoding.UTF8.GetByteCount(b.Name!))) +
                Qcow2BitmapDirectoryEntry.SizeFor(nameBytes);
            if (count > Qcow2BitmapsExtension.MaxBitmaps)
            {
                reason = "Maximum number of persistent bitmaps is already reached";
            }
            else if (size > Qcow2BitmapsExtension.MaxDirectorySize)
            {
                reason = "Not enough space in the bitmap directory";
            }
        }
        if (reason is not null)
        {
            throw new BlockException($"Can't make bitmap '{name}' persistent in '{NodeName}': {reason}");
        }
    }

    public async ValueTask RemoveStoredAsync(string name, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(name);
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (ReadOnly || !_bitmapDirectory.Exists(e => e.Name == name))
            {
                return;
            }
            var wasCrashConsistent = _crashRegions.ContainsKey(name);
            await StopCrashConsistencyAsync(name, forget: true).ConfigureAwait(false);
            await RewriteBitmapsLockedAsync([], [name], inUse: false, cancellationToken).ConfigureAwait(false);
            if (wasCrashConsistent)
            {
                await WriteCrashConsistentHeaderLockedAsync(cancellationToken).ConfigureAwait(false);
            }
            // While the node stays open, give back the allocation reserve too: the image checks clean now.
            await ReleaseReserveAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _meta.Release();
        }
    }

    public async ValueTask StoreAsync(DirtyBitmap bitmap, bool inUse, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        if (!ReferenceEquals(bitmap.Node, this) || !bitmap.Persistent || bitmap.Name is null)
        {
            throw new ArgumentException($"{bitmap} is not a persistent bitmap of this node", nameof(bitmap));
        }
        if (ReadOnly)
        {
            throw new BlockException($"Can't store bitmap '{bitmap.Name}' to read-only node '{NodeName}'");
        }
        if (_crashTrackers.ContainsKey(bitmap.Name))
        {
            // Its journal writes into the clusters a store would free.
            throw new InvalidOperationException($"bitmap '{bitmap.Name}' is crash-consistent: its journal keeps it stored");
        }
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await RewriteBitmapsLockedAsync([bitmap], [], inUse, cancellationToken).ConfigureAwait(false);
            await ReleaseReserveAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _meta.Release();
        }
    }

    // ------------------------------------------------------------------ close

    /// <summary>
    /// At clean close (metadata lock held): stores every consistent persistent bitmap with in_use clear,
    /// keeps the entries of inconsistent ones as they are (still in use, as QEMU leaves them) and drops
    /// stored bitmaps that are no longer persistent bitmaps of the node.
    /// </summary>
    private async ValueTask StoreBitmapsOnCloseLockedAsync(CancellationToken cancellationToken)
    {
        var persistent = (this.TryGetDirtyBitmaps()?.Bitmaps ?? []).Where(b => b.Persistent && b.Name is not null).ToList();
        if (persistent.Count == 0 && _bitmapDirectory.Count == 0)
        {
            return;
        }
        var names = persistent.Select(b => b.Name!).ToHashSet(StringComparer.Ordinal);
        var drop = _bitmapDirectory.Where(e => !names.Contains(e.Name)).Select(e => e.Name).ToList();
        var write = persistent.Where(b => !b.Inconsistent).ToList();
        await RewriteBitmapsLockedAsync(write, drop, inUse: false, cancellationToken).ConfigureAwait(false);
    }

    // ------------------------------------------------------------------ the one store path

    /// <summary>
    /// Writes <paramref name="write"/> (newest first, as the set lists them) to new clusters, replacing
    /// their entries or appending new ones after the existing entries (QEMU's directory order), removes
    /// the entries named in <paramref name="drop"/>, switches the header to a new directory, then frees
    /// every cluster the old directory and the replaced or dropped entries used.
    /// </summary>
    private async ValueTask RewriteBitmapsLockedAsync(IReadOnlyList<DirtyBitmap> write, IReadOnlyList<string> drop, bool inUse,
        CancellationToken cancellationToken)
    {
        var byName = write.ToDictionary(b => b.Name!, StringComparer.Ordinal);
        var dropSet = drop.ToHashSet(StringComparer.Ordinal);
        var entries = new List<Qcow2BitmapDirectoryEntry>();
        var freed = new List<long>();
        foreach (var old in _bitmapDirectory)
        {
            if (dropSet.Contains(old.Name))
            {
                freed.AddRange(await ClustersOfAsync(old, cancellationToken).ConfigureAwait(false));
            }
            else if (byName.Remove(old.Name, out var bitmap))
            {
                entries.Add(await WriteBitmapDataAsync(bitmap, inUse, cancellationToken).ConfigureAwait(false));
                freed.AddRange(await ClustersOfAsync(old, cancellationToken).ConfigureAwait(false));
            }
            else
            {
                entries.Add(old);
            }
        }
        foreach (var bitmap in write)
        {
            if (byName.ContainsKey(bitmap.Name!))
            {
                entries.Add(await WriteBitmapDataAsync(bitmap, inUse, cancellationToken).ConfigureAwait(false));
            }
        }
        await CommitDirectoryAsync(entries, freed, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// Writes a bitmap's data clusters and its table; returns its directory entry. All-zero data clusters
    /// are not written (table entry 0), unless <paramref name="dataClusters"/> asks for every one to be
    /// allocated and its host offset recorded there (a crash-consistent bitmap's journal writes into them).
    /// </summary>
    private async ValueTask<Qcow2BitmapDirectoryEntry> WriteBitmapDataAsync(DirtyBitmap bitmap, bool inUse, CancellationToken cancellationToken,
        long[]? dataClusters = null)
    {
        var bits = bitmap.Bits;
        var granularity = bitmap.Granularity;
        var tableSize = (int)Qcow2BitmapDirectoryEntry.TableSizeFor(_virtualSize, granularity, _clusterSize);
        var tableClusters = Math.Max(1, (tableSize * 8 + _clusterSize - 1) / _clusterSize);
        var table = new byte[tableClusters * _clusterSize];
        var covered = BytesPerDataCluster(granularity);
        var buffer = new byte[_clusterSize];
        for (var i = 0; i < tableSize; i++)
        {
            var offset = i * covered;
            var length = Math.Max(0, Math.Min(covered, bits.Size - offset));
            if (dataClusters is null && (length == 0 || bits.NextDirty(offset, length) < 0))
            {
                continue;
            }
            Array.Clear(buffer);
            if (length > 0)
            {
                bits.Serialize(offset, length, buffer);
            }
            var host = await AllocateClusterAsync(cancellationToken).ConfigureAwait(false);
            await _file.WriteAsync(host, buffer, WriteFlags.None, cancellationToken).ConfigureAwait(false);
            BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan(i * 8), (ulong)host);
            if (dataClusters is not null)
            {
                dataClusters[i] = host;
            }
        }
        var tableOffset = await AllocateContiguousAsync(tableClusters, cancellationToken).ConfigureAwait(false);
        await _file.WriteAsync(tableOffset, table, WriteFlags.None, cancellationToken).ConfigureAwait(false);
        return new Qcow2BitmapDirectoryEntry
        {
            TableOffset = (ulong)tableOffset,
            TableSize = (uint)tableSize,
            Flags = (inUse ? Qcow2BitmapDirectoryEntry.FlagInUse : 0) | (bitmap.Recording ? Qcow2BitmapDirectoryEntry.FlagAuto : 0),
            GranularityBits = BitOperations.Log2((ulong)granularity),
            Name = bitmap.Name!,
        };
    }

    /// <summary>
    /// Writes the directory to new clusters, makes everything durable, points the header at it (or drops
    /// the extension and the autoclear bit when no bitmap is left), then frees the old clusters.
    /// </summary>
    private async ValueTask CommitDirectoryAsync(List<Qcow2BitmapDirectoryEntry> entries, List<long> freed, CancellationToken cancellationToken)
    {
        Qcow2BitmapsExtension? ext = null;
        if (entries.Count > 0)
        {
            var bytes = Qcow2BitmapDirectory.Write(entries);
            if (entries.Count > Qcow2BitmapsExtension.MaxBitmaps || bytes.Length > Qcow2BitmapsExtension.MaxDirectorySize)
            {
                throw new BlockException("Bitmap directory is too large");
            }
            var clusters = (bytes.Length + _clusterSize - 1) / _clusterSize;
            var offset = await AllocateContiguousAsync(clusters, cancellationToken).ConfigureAwait(false);
            var padded = new byte[clusters * _clusterSize];
            bytes.CopyTo(padded, 0);
            await _file.WriteAsync(offset, padded, WriteFlags.None, cancellationToken).ConfigureAwait(false);
            ext = new Qcow2BitmapsExtension((uint)entries.Count, (ulong)bytes.Length, (ulong)offset);
        }
        // Data, tables and directory are durable before the header points at them.
        await _file.FlushAsync(cancellationToken).ConfigureAwait(false);
        if (_bitmapsExtension is { } old)
        {
            freed.AddRange(ClusterRun((long)old.DirectoryOffset, (long)old.DirectorySize));
        }
        await WriteBitmapsHeaderAsync(ext, cancellationToken).ConfigureAwait(false);
        _bitmapsExtension = ext;
        _bitmapDirectory = entries;
        foreach (var c in freed)
        {
            FreeLater(c);
        }
        // Flushes the header first, so no reachable metadata ever points at a freed cluster.
        await ProcessPendingFreesAsync(cancellationToken).ConfigureAwait(false);
    }

    /// <summary>The host clusters a stored bitmap owns: its data clusters and its table.</summary>
    private async ValueTask<List<long>> ClustersOfAsync(Qcow2BitmapDirectoryEntry entry, CancellationToken cancellationToken)
    {
        var table = await ReadTableAsync(_file, (long)entry.TableOffset, (int)entry.TableSize, cancellationToken).ConfigureAwait(false);
        var clusters = new List<long>();
        foreach (var raw in table)
        {
            var t = new Qcow2BitmapTableEntry(raw);
            if (t.Offset != 0 && t.IsValid(_clusterSize))
            {
                clusters.Add(t.Offset);
            }
        }
        clusters.AddRange(ClusterRun((long)entry.TableOffset, Math.Max(1, (long)entry.TableSize * 8)));
        return clusters;
    }

    private IEnumerable<long> ClusterRun(long offset, long bytes)
    {
        var count = (bytes + _clusterSize - 1) / _clusterSize;
        for (long i = 0; i < count; i++)
        {
            yield return offset + i * _clusterSize;
        }
    }

    /// <summary>Replaces, adds or (with null) removes the bitmaps extension and sets the autoclear bit to match.</summary>
    private async ValueTask WriteBitmapsHeaderAsync(Qcow2BitmapsExtension? ext, CancellationToken cancellationToken)
    {
        var extensions = _headerCluster.Extensions.ToList();
        var index = extensions.FindIndex(e => e.Type == Qcow2HeaderExtension.Bitmaps);
        if (ext is { } value)
        {
            var raw = new Qcow2HeaderExtension(Qcow2HeaderExtension.Bitmaps, value.ToArray());
            if (index >= 0)
            {
                extensions[index] = raw;
            }
            else
            {
                // Where QEMU puts it: after the feature name table.
                var table = extensions.FindIndex(e => e.Type == Qcow2HeaderExtension.FeatureNameTable);
                extensions.Insert(table >= 0 ? table + 1 : extensions.Count, raw);
            }
        }
        else if (index >= 0)
        {
            extensions.RemoveAt(index);
        }
        var h = _headerCluster.Header;
        var autoclear = ext is null
            ? h.AutoclearFeatures & ~Qcow2Header.AutoclearBitmaps
            : h.AutoclearFeatures | Qcow2Header.AutoclearBitmaps;
        var previous = _headerCluster;
        _headerCluster = previous with { Extensions = extensions };
        try
        {
            await RewriteHeaderAsync(h.Version >= 3 ? h with { AutoclearFeatures = autoclear } : h, cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            _headerCluster = previous;
            throw;
        }
    }

    /// <summary>
    /// <paramref name="count"/> adjacent free clusters (bitmap tables and the directory must be contiguous),
    /// their refcounts raised and flushed before anything points at them. Free clusters skipped on the
    /// way stay free: the search hint goes back to where it was.
    /// </summary>
    private async ValueTask<long> AllocateContiguousAsync(int count, CancellationToken cancellationToken)
    {
        if (count == 1)
        {
            return await AllocateClusterAsync(cancellationToken).ConfigureAwait(false);
        }
        var hint = _freeHint;
        var run = new List<long>(count);
        while (run.Count < count)
        {
            var c = await FindFreeClusterAsync(cancellationToken).ConfigureAwait(false);
            if (run.Count > 0 && c != run[^1] + 1)
            {
                run.Clear();
            }
            run.Add(c);
        }
        await UpdateRefcountsAsync([.. run], +1, cancellationToken).ConfigureAwait(false);
        await _file.FlushAsync(cancellationToken).ConfigureAwait(false);
        _freeHint = Math.Min(_freeHint, hint);
        return run[0] * _clusterSize;
    }
}
