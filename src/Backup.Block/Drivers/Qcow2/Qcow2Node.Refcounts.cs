using System.Buffers;
using System.Buffers.Binary;

namespace Backup.Block.Drivers.Qcow2;

// Refcounts and cluster allocation (qcow2.txt "Host cluster management"). Everything here runs under
// the metadata lock.
public sealed partial class Qcow2Node
{
    /// <summary>Clusters whose refcount is already 1 on stable storage and that nothing references yet.</summary>
    private readonly Queue<long> _reserve = new();

    /// <summary>Host cluster offsets whose reference was dropped; their refcount goes down after the next flush.</summary>
    private readonly List<long> _pendingFrees = [];

    /// <summary>Clusters below this index are known to be in use; the free-cluster search starts here.</summary>
    private long _freeHint;

    /// <summary>How many clusters the first refill of the reserve takes (about 32 MiB, at most 8192 clusters).</summary>
    private int ReserveBatch { get; }

    /// <summary>
    /// How many clusters the next refill takes. It doubles, up to <see cref="MaxReserveBytes"/>, while
    /// refills follow each other within a second (a write storm), so that the durable refcount write —
    /// a device flush, slow on a busy disk — is paid once per 256 MiB rather than once per 32 MiB. What
    /// a crash can leak is at most this much; a clean close gives the reserve back.
    /// </summary>
    private int _reserveBatch;

    private long _lastRefill = long.MinValue / 2;

    private const long MaxReserveBytes = 256L << 20;

    /// <summary>Pending frees beyond this many are processed without waiting for a guest flush.</summary>
    private const int MaxPendingFrees = 4096;

    /// <summary>A host cluster for new data or metadata. Its refcount is 1 and durable.</summary>
    private async ValueTask<long> AllocateClusterAsync(CancellationToken cancellationToken)
    {
        if (_reserve.Count == 0)
        {
            var now = Environment.TickCount64;
            _reserveBatch = now - _lastRefill < 1000
                ? (int)Math.Min(Math.Max(_reserveBatch, ReserveBatch) * 2L, Math.Max(ReserveBatch, Math.Min(MaxReserveBytes / _clusterSize, 65536)))
                : ReserveBatch;
            _lastRefill = now;
            await RefillReserveAsync(_reserveBatch, cancellationToken).ConfigureAwait(false);
        }
        return _reserve.Dequeue();
    }

    private async ValueTask RefillReserveAsync(int count, CancellationToken cancellationToken)
    {
        var clusters = new List<long>(count);
        for (var i = 0; i < count; i++)
        {
            clusters.Add(await FindFreeClusterAsync(cancellationToken).ConfigureAwait(false));
        }
        // Durable writes (FUA) are the barrier that makes "refcount before reference" hold on power loss
        // too. A flush would do the same but write back every dirty page of the image (all the guest
        // data written since the last one) each time the reserve runs dry.
        await UpdateRefcountsAsync(clusters, +1, cancellationToken, WriteFlags.Fua).ConfigureAwait(false);
        // Grow the file over the batch now (sparse): writes past the end of a file are serialised by
        // the file system (ext4 takes the inode lock exclusively and waits for other O_DIRECT writes
        // before extending), writes inside it run in parallel.
        var end = (clusters.Max() + 1) * _clusterSize;
        if (end > _file.Length)
        {
            await _file.TruncateAsync(end, cancellationToken).ConfigureAwait(false);
        }
        foreach (var c in clusters)
        {
            _reserve.Enqueue(c * _clusterSize);
        }
    }

    private async ValueTask ReleaseReserveAsync(CancellationToken cancellationToken)
    {
        if (_reserve.Count == 0)
        {
            return;
        }
        var clusters = _reserve.Select(o => o >> _clusterBits).ToList();
        _reserve.Clear();
        await UpdateRefcountsAsync(clusters, -1, cancellationToken).ConfigureAwait(false);
        // The next refill after a flush or close starts small again: the storm it was sized for is over.
        _lastRefill = long.MinValue / 2;

        // A refill grows the file over its whole batch; give back the unused tail, so the file ends
        // where its data does. The refcounts reach the disk first: no refcount may outlive the file end.
        var released = clusters.ToHashSet();
        var end = (_file.Length + _clusterSize - 1) >> _clusterBits;
        var newEnd = end;
        while (newEnd > 0 && released.Contains(newEnd - 1))
        {
            newEnd--;
        }
        if (newEnd < end)
        {
            await _file.FlushAsync(cancellationToken).ConfigureAwait(false);
            await _file.TruncateAsync(newEnd << _clusterBits, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Records that <paramref name="hostOffset"/>'s cluster lost a reference. The caller writes the
    /// entry that dropped it before the metadata lock is released; the refcount goes down later.
    /// </summary>
    private void FreeLater(long hostOffset) => _pendingFrees.Add(hostOffset);

    /// <summary>Drops a reference to every cluster a compressed cluster's data touches (as qemu-img check counts them).</summary>
    private void FreeCompressedLater(Qcow2L2Entry entry)
    {
        var start = entry.CompressedOffset(_clusterBits) & ~511L;
        var end = start + entry.CompressedSectors(_clusterBits) * 512L;
        for (var c = start >> _clusterBits; c <= (end - 1) >> _clusterBits; c++)
        {
            FreeLater(c << _clusterBits);
        }
    }

    /// <summary>
    /// Called at the end of a metadata operation, when every entry it changed is written: keeps the
    /// list of pending frees bounded without waiting for a guest flush.
    /// </summary>
    private async ValueTask ProcessPendingFreesIfManyAsync(CancellationToken cancellationToken)
    {
        if (_pendingFrees.Count >= MaxPendingFrees)
        {
            await ProcessPendingFreesAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Lowers the refcounts of clusters whose references were dropped: first a flush so the dropped
    /// references are durable, then a wait for lock-free requests that may still use them.
    /// </summary>
    private async ValueTask ProcessPendingFreesAsync(CancellationToken cancellationToken)
    {
        if (_pendingFrees.Count == 0)
        {
            return;
        }
        await _file.FlushAsync(cancellationToken).ConfigureAwait(false);
        await DrainLockFreeRequestsAsync(cancellationToken).ConfigureAwait(false);
        var clusters = _pendingFrees.Select(o => o >> _clusterBits).ToList();
        _pendingFrees.Clear();
        foreach (var c in clusters)
        {
            _l2Cache.Remove(c << _clusterBits);
            ForgetCompressedCluster(c);
        }
        await UpdateRefcountsAsync(clusters, -1, cancellationToken).ConfigureAwait(false);
    }

    // ------------------------------------------------------------------ refcount access

    private ulong GetRefcount(byte[] block, int index)
    {
        switch (_refcountOrder)
        {
            case < 3:
                var bits = 1 << _refcountOrder;
                var bit = index * bits;
                return (ulong)((block[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1));
            case 3:
                return block[index];
            case 4:
                return BinaryPrimitives.ReadUInt16BigEndian(block.AsSpan(index * 2));
            case 5:
                return BinaryPrimitives.ReadUInt32BigEndian(block.AsSpan(index * 4));
            default:
                return BinaryPrimitives.ReadUInt64BigEndian(block.AsSpan(index * 8));
        }
    }

    /// <summary>Sets a refcount and returns the byte range of the block that changed.</summary>
    private (int Start, int Length) SetRefcount(byte[] block, int index, ulong value)
    {
        switch (_refcountOrder)
        {
            case < 3:
                var bits = 1 << _refcountOrder;
                var bit = index * bits;
                var mask = ((1 << bits) - 1) << (bit & 7);
                block[bit >> 3] = (byte)((block[bit >> 3] & ~mask) | (((int)value << (bit & 7)) & mask));
                return (bit >> 3, 1);
            case 3:
                block[index] = (byte)value;
                return (index, 1);
            case 4:
                BinaryPrimitives.WriteUInt16BigEndian(block.AsSpan(index * 2), (ushort)value);
                return (index * 2, 2);
            case 5:
                BinaryPrimitives.WriteUInt32BigEndian(block.AsSpan(index * 4), (uint)value);
                return (index * 4, 4);
            default:
                BinaryPrimitives.WriteUInt64BigEndian(block.AsSpan(index * 8), value);
                return (index * 8, 8);
        }
    }

    private async ValueTask<byte[]> LoadRefBlockAsync(long offset, CancellationToken cancellationToken)
    {
        if (_refCache.TryGet(offset) is { } cached)
        {
            return cached;
        }
        var block = new byte[_clusterSize];
        await ReadFileAsync(_file, offset, block, cancellationToken).ConfigureAwait(false);
        _refCache.Put(offset, block);
        return block;
    }

    private async ValueTask<ulong> GetRefcountAsync(long cluster, CancellationToken cancellationToken)
    {
        var group = cluster / _refBlockEntries;
        if (group >= _refTable.Length)
        {
            return 0;
        }
        var blockOffset = new Qcow2RefcountTableEntry(_refTable[group]).BlockOffset;
        if (blockOffset == 0)
        {
            return 0;
        }
        var block = await LoadRefBlockAsync(blockOffset, cancellationToken).ConfigureAwait(false);
        return GetRefcount(block, (int)(cluster % _refBlockEntries));
    }

    /// <summary>
    /// Adds <paramref name="delta"/> to the refcount of each cluster (a cluster listed twice changes
    /// twice), writing each changed block range through. Creates refcount blocks as needed.
    /// </summary>
    private async ValueTask UpdateRefcountsAsync(List<long> clusters, int delta, CancellationToken cancellationToken,
        WriteFlags flags = WriteFlags.None)
    {
        clusters.Sort();
        byte[]? block = null;
        long blockOffset = 0;
        int dirtyStart = int.MaxValue, dirtyEnd = -1;
        foreach (var cluster in clusters)
        {
            var group = cluster / _refBlockEntries;
            var offset = group < _refTable.Length ? new Qcow2RefcountTableEntry(_refTable[group]).BlockOffset : 0;
            if (block is null || offset != blockOffset || offset == 0)
            {
                // Write what changed in the previous block before another block may evict it from the cache.
                await WriteDirtyAsync().ConfigureAwait(false);
                if (offset == 0)
                {
                    if (delta < 0)
                    {
                        throw new BlockException($"qcow2: refcount of cluster {cluster} would drop below zero (image corrupt?)");
                    }
                    offset = await CreateRefBlockAsync(group, flags, cancellationToken).ConfigureAwait(false);
                }
                block = await LoadRefBlockAsync(offset, cancellationToken).ConfigureAwait(false);
                blockOffset = offset;
            }
            var index = (int)(cluster % _refBlockEntries);
            var old = GetRefcount(block, index);
            if ((delta < 0 && old < (ulong)-delta) || (delta > 0 && _refcountMax - old < (ulong)delta))
            {
                await WriteDirtyAsync().ConfigureAwait(false);
                throw new BlockException($"qcow2: refcount of cluster {cluster} out of range ({old} {delta:+#;-#})");
            }
            var value = (ulong)((long)old + delta);
            var (start, length) = SetRefcount(block, index, value);
            dirtyStart = Math.Min(dirtyStart, start);
            dirtyEnd = Math.Max(dirtyEnd, start + length);
            if (value == 0 && cluster < _freeHint)
            {
                _freeHint = cluster;
            }
        }
        await WriteDirtyAsync().ConfigureAwait(false);

        async ValueTask WriteDirtyAsync()
        {
            if (block is not null && dirtyEnd > dirtyStart)
            {
                // Widened to whole 4 KiB blocks for the same reason as L2 writes (the block in the
                // cache is the file's content plus these changes).
                var align = Math.Min(MetadataWriteAlignment, _clusterSize);
                dirtyStart = dirtyStart / align * align;
                dirtyEnd = Math.Min(_clusterSize, (dirtyEnd + align - 1) / align * align);
                await _file.DebugEventAsync(BlkdebugEvent.RefblockUpdatePart).ConfigureAwait(false);
                await _file.WriteAsync(blockOffset + dirtyStart, block.AsMemory(dirtyStart, dirtyEnd - dirtyStart),
                    flags, cancellationToken).ConfigureAwait(false);
            }
            dirtyStart = int.MaxValue;
            dirtyEnd = -1;
        }
    }

    /// <summary>
    /// Creates the refcount block of <paramref name="group"/>. It goes into the group's first cluster,
    /// which is free (no block means every refcount in the group is 0) and which the free-cluster search
    /// never hands out, so the block describes itself. Written before the table entry points at it.
    /// </summary>
    private async ValueTask<long> CreateRefBlockAsync(long group, WriteFlags flags, CancellationToken cancellationToken)
    {
        if (group >= _refTable.Length)
        {
            throw new InvalidOperationException("qcow2: refcount table does not cover the cluster being allocated");
        }
        var offset = group * _refBlockEntries * _clusterSize;
        var block = new byte[_clusterSize];
        SetRefcount(block, 0, 1);
        await _file.WriteAsync(offset, block, flags, cancellationToken).ConfigureAwait(false);
        _refCache.Put(offset, block);
        _refTable[group] = (ulong)offset;
        var entry = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(entry, (ulong)offset);
        await _file.WriteAsync(_refTableOffset + group * 8, entry, flags, cancellationToken).ConfigureAwait(false);
        return offset;
    }

    /// <summary>The next cluster whose refcount is 0, growing the refcount table when the search runs past it.</summary>
    private async ValueTask<long> FindFreeClusterAsync(CancellationToken cancellationToken)
    {
        var cluster = _freeHint;
        while (true)
        {
            var group = cluster / _refBlockEntries;
            if (group >= _refTable.Length)
            {
                await GrowRefTableAsync(group, cancellationToken).ConfigureAwait(false);
                continue;
            }
            var blockOffset = new Qcow2RefcountTableEntry(_refTable[group]).BlockOffset;
            var index = (int)(cluster % _refBlockEntries);
            if (blockOffset == 0)
            {
                if (index == 0)
                {
                    // Kept for the group's refcount block (see CreateRefBlockAsync).
                    cluster++;
                    continue;
                }
                _freeHint = cluster + 1;
                return cluster;
            }
            var block = await LoadRefBlockAsync(blockOffset, cancellationToken).ConfigureAwait(false);
            for (; index < _refBlockEntries; index++)
            {
                if (GetRefcount(block, index) == 0)
                {
                    var found = group * _refBlockEntries + index;
                    _freeHint = found + 1;
                    return found;
                }
            }
            cluster = (group + 1) * _refBlockEntries;
        }
    }

    /// <summary>
    /// Replaces the refcount table by a larger one that covers <paramref name="neededGroup"/>. The new
    /// table and the refcount blocks describing it go right after the area the old table covers (all
    /// free there), are written and flushed, and only then does the header switch to them. A crash
    /// before the header write leaves the old table in charge and the new clusters unreferenced.
    /// </summary>
    private async ValueTask GrowRefTableAsync(long neededGroup, CancellationToken cancellationToken)
    {
        var oldEntries = _refTable.Length;
        var firstGroup = (long)oldEntries;
        var start = firstGroup * _refBlockEntries;
        var entriesPerCluster = _clusterSize / 8;
        long newEntries = Math.Max(neededGroup + 1, Math.Max(oldEntries * 2L, oldEntries + 1));
        long blocks = 1, tableClusters;
        while (true)
        {
            tableClusters = (newEntries + entriesPerCluster - 1) / entriesPerCluster;
            var regionClusters = blocks + tableClusters;
            var neededBlocks = (regionClusters + _refBlockEntries - 1) / _refBlockEntries;
            if (neededBlocks > blocks)
            {
                blocks = neededBlocks;
                continue;
            }
            if (newEntries < firstGroup + blocks)
            {
                newEntries = firstGroup + blocks;
                continue;
            }
            break;
        }
        newEntries = tableClusters * entriesPerCluster;
        if (tableClusters * _clusterSize > 8L << 20)
        {
            throw new BlockException("qcow2: refcount table would exceed 8 MiB; image too large for this cluster size");
        }

        var regionEnd = start + blocks + tableClusters;
        var blockData = new byte[blocks][];
        for (var j = 0; j < blocks; j++)
        {
            blockData[j] = new byte[_clusterSize];
        }
        for (var c = start; c < regionEnd; c++)
        {
            SetRefcount(blockData[(c - start) / _refBlockEntries], (int)((c - start) % _refBlockEntries), 1);
        }
        for (var j = 0; j < blocks; j++)
        {
            await _file.WriteAsync((start + j) * _clusterSize, blockData[j], WriteFlags.None, cancellationToken).ConfigureAwait(false);
        }
        var newTable = new ulong[newEntries];
        Array.Copy(_refTable, newTable, oldEntries);
        for (var j = 0; j < blocks; j++)
        {
            newTable[firstGroup + j] = (ulong)((start + j) * _clusterSize);
        }
        var tableOffset = (start + blocks) * _clusterSize;
        var tableBytes = new byte[tableClusters * _clusterSize];
        for (var i = 0; i < newEntries; i++)
        {
            BinaryPrimitives.WriteUInt64BigEndian(tableBytes.AsSpan(i * 8), newTable[i]);
        }
        await _file.WriteAsync(tableOffset, tableBytes, WriteFlags.None, cancellationToken).ConfigureAwait(false);
        await _file.FlushAsync(cancellationToken).ConfigureAwait(false);

        // refcount_table_offset and refcount_table_clusters are adjacent (bytes 48-59): one write switches both.
        var field = new byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(field, (ulong)tableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(field.AsSpan(8), (uint)tableClusters);
        await _file.WriteAsync(48, field, WriteFlags.None, cancellationToken).ConfigureAwait(false);
        await _file.FlushAsync(cancellationToken).ConfigureAwait(false);

        var oldOffset = _refTableOffset;
        var oldClusters = (oldEntries * 8L + _clusterSize - 1) / _clusterSize;
        _refTable = newTable;
        _refTableOffset = tableOffset;
        _headerCluster = _headerCluster with
        {
            Header = _headerCluster.Header with { RefcountTableOffset = (ulong)tableOffset, RefcountTableClusters = (uint)tableClusters },
        };
        for (var j = 0; j < blocks; j++)
        {
            _refCache.Put((start + j) * _clusterSize, blockData[j]);
        }
        for (var c = 0; c < oldClusters; c++)
        {
            _pendingFrees.Add(oldOffset + c * _clusterSize);
        }
    }

    /// <summary>Writes a run of L2 entries of a table through to the file.</summary>
    private async ValueTask WriteL2EntriesAsync(long l2Offset, ulong[] table, int first, int count, CancellationToken cancellationToken)
    {
        // Whole 4 KiB blocks of the table: the cached table is exactly what the file holds plus this
        // change (every change is written through under the metadata lock), and a block-aligned write
        // spares an O_DIRECT file a read-modify-write (a synchronous read under the lock) per request.
        var perBlock = Math.Min(MetadataWriteAlignment, _clusterSize) / 8;
        var end = (first + count + perBlock - 1) / perBlock * perBlock;
        first = first / perBlock * perBlock;
        count = end - first;
        var bytes = ArrayPool<byte>.Shared.Rent(count * 8);
        try
        {
            for (var i = 0; i < count; i++)
            {
                BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(i * 8), Volatile.Read(ref table[first + i]));
            }
            await _file.DebugEventAsync(BlkdebugEvent.L2Update).ConfigureAwait(false);
            await _file.WriteAsync(l2Offset + first * 8L, bytes.AsMemory(0, count * 8), WriteFlags.None, cancellationToken)
                .ConfigureAwait(false);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(bytes);
        }
    }

    /// <summary>Metadata writes are widened to this alignment (the file node's O_DIRECT block), when the cluster is that large.</summary>
    private const int MetadataWriteAlignment = 4096;

    private async ValueTask WriteL1EntryAsync(int index, CancellationToken cancellationToken)
    {
        var bytes = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(bytes, Volatile.Read(ref _l1[index]));
        await _file.DebugEventAsync(BlkdebugEvent.L1Update).ConfigureAwait(false);
        await _file.WriteAsync(_l1Offset + index * 8L, bytes, WriteFlags.None, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Loads an L2 table into the cache (under the metadata lock).</summary>
    private async ValueTask<ulong[]> LoadL2Async(long offset, CancellationToken cancellationToken)
    {
        if (_l2Cache.TryGet(offset) is { } cached)
        {
            return cached;
        }
        var bytes = ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            await _file.DebugEventAsync(BlkdebugEvent.L2Load).ConfigureAwait(false);
            await ReadFileAsync(_file, offset, bytes.AsMemory(0, _clusterSize), cancellationToken).ConfigureAwait(false);
            var table = new ulong[_l2Entries];
            for (var i = 0; i < _l2Entries; i++)
            {
                table[i] = BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(i * 8));
            }
            _l2Cache.Put(offset, table);
            return table;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(bytes);
        }
    }

    /// <summary>
    /// The L2 table for <paramref name="l1Index"/>, ready to be changed: allocated if missing, copied
    /// if shared with a snapshot (L1 entry without COPIED). The new table is written before the L1
    /// entry points at it.
    /// </summary>
    private async ValueTask<(ulong[] Table, long Offset)> GetL2ForUpdateAsync(int l1Index, CancellationToken cancellationToken)
    {
        var l1 = new Qcow2L1Entry(_l1[l1Index]);
        if (l1.IsAllocated && l1.IsCopied)
        {
            return (await LoadL2Async(l1.L2Offset, cancellationToken).ConfigureAwait(false), l1.L2Offset);
        }
        var table = l1.IsAllocated
            ? (ulong[])(await LoadL2Async(l1.L2Offset, cancellationToken).ConfigureAwait(false)).Clone()
            : new ulong[_l2Entries];
        var offset = await AllocateClusterAsync(cancellationToken).ConfigureAwait(false);
        var bytes = ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            for (var i = 0; i < _l2Entries; i++)
            {
                BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(i * 8), table[i]);
            }
            await _file.WriteAsync(offset, bytes.AsMemory(0, _clusterSize), WriteFlags.Fua, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(bytes);
        }
        _l2Cache.Put(offset, table);
        Volatile.Write(ref _l1[l1Index], Qcow2L1Entry.For(offset).Raw);
        await WriteL1EntryAsync(l1Index, cancellationToken).ConfigureAwait(false);
        if (l1.IsAllocated)
        {
            FreeLater(l1.L2Offset);
        }
        return (table, offset);
    }
}

public sealed partial class Qcow2Node
{
    /// <summary>
    /// Maps every unallocated guest cluster to a fresh host cluster and grows the file over them; with an
    /// external data file, to its own place there (host offset = guest offset), growing the data file.
    /// </summary>
    internal async ValueTask PreallocateAsync(CancellationToken cancellationToken)
    {
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            var clusters = (_virtualSize + _clusterSize - 1) >> _clusterBits;
            long end = 0;
            for (var l1Index = 0; (long)l1Index * _l2Entries < clusters; l1Index++)
            {
                var (table, l2Offset) = await GetL2ForUpdateAsync(l1Index, cancellationToken).ConfigureAwait(false);
                end = Math.Max(end, l2Offset + _clusterSize);
                var count = (int)Math.Min(_l2Entries, clusters - (long)l1Index * _l2Entries);
                for (var i = 0; i < count; i++)
                {
                    if (new Qcow2L2Entry(table[i]).IsUnallocated)
                    {
                        if (_hasDataFile)
                        {
                            table[i] = Qcow2L2Entry.Standard(((long)l1Index * _l2Entries + i) << _clusterBits).Raw;
                            continue;
                        }
                        var host = await AllocateClusterAsync(cancellationToken).ConfigureAwait(false);
                        table[i] = Qcow2L2Entry.Standard(host).Raw;
                        end = Math.Max(end, host + _clusterSize);
                    }
                }
                await WriteL2EntriesAsync(l2Offset, table, 0, count, cancellationToken).ConfigureAwait(false);
            }
            if (end > _file.Length)
            {
                await _file.TruncateAsync(end, cancellationToken).ConfigureAwait(false);
            }
            if (_hasDataFile && _data.Length < _virtualSize)
            {
                await _data.TruncateAsync(_virtualSize, cancellationToken).ConfigureAwait(false);
            }
        }
        finally
        {
            _meta.Release();
        }
    }
}
