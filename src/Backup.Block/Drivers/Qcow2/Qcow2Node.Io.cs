using System.Buffers;
using System.IO.Compression;
using System.Runtime.CompilerServices;
using Backup.Block.Posix;

namespace Backup.Block.Drivers.Qcow2;

// The guest-facing requests: mapping guest offsets through L1/L2, reads, writes with allocation and
// copy-on-write, zero clusters, discard, block status and flush.
public sealed partial class Qcow2Node
{
    private enum ClusterKind
    {
        /// <summary>No data here and no zero flag: reads go to the backing node.</summary>
        Unallocated,
        /// <summary>Reads as zeros (zero flag), whether or not a host cluster is preallocated.</summary>
        Zero,
        /// <summary>Standard cluster with refcount 1: writable in place.</summary>
        DataCopied,
        /// <summary>Standard cluster shared with a snapshot: writes copy it first.</summary>
        DataShared,
        Compressed,
    }

    /// <summary>A run of guest bytes within one L2 table that map the same way (contiguous host data, zeros, ...).</summary>
    private readonly record struct Mapping(ClusterKind Kind, long HostOffset, int Length, Qcow2L2Entry Entry);

    private bool IsV3 => _headerCluster.Header.Version >= 3;

    private long L2Coverage => (long)_clusterSize << _l2Bits;

    private ClusterKind KindOf(Qcow2L2Entry e) =>
        e.IsCompressed ? ClusterKind.Compressed
        : e.IsZero ? ClusterKind.Zero
        : !HasHostCluster(e) ? ClusterKind.Unallocated
        : e.IsCopied ? ClusterKind.DataCopied
        : ClusterKind.DataShared;

    /// <summary>
    /// Whether a standard entry names a host cluster. Offset 0 means "none" except with an external data
    /// file, where offset 0 with COPIED is guest cluster 0's place in the data file (qcow2.txt).
    /// </summary>
    private bool HasHostCluster(Qcow2L2Entry e) => !e.IsCompressed && (e.HostOffset != 0 || (_hasDataFile && e.IsCopied));

    /// <summary>A data cluster that only this entry references: writable in place.</summary>
    private bool IsWritableInPlace(Qcow2L2Entry e) => !e.IsZero && e.IsCopied && HasHostCluster(e);

    /// <summary>Maps from <paramref name="guestOffset"/> up to <paramref name="maxLength"/> bytes, stopping at the end of the L2 table.</summary>
    private Mapping Map(ulong[]? table, long guestOffset, long maxLength)
    {
        var cluster = guestOffset >> _clusterBits;
        var index = (int)(cluster & (_l2Entries - 1));
        var intra = (int)(guestOffset & (_clusterSize - 1));
        var entry = table is null ? Qcow2L2Entry.Unallocated : new Qcow2L2Entry(Volatile.Read(ref table[index]));
        var kind = KindOf(entry);
        var limit = (int)Math.Min(maxLength, (long)(_l2Entries - index) * _clusterSize - intra);
        var length = Math.Min(_clusterSize - intra, limit);
        if (kind != ClusterKind.Compressed)
        {
            for (var i = index + 1; length < limit; i++)
            {
                var next = table is null ? Qcow2L2Entry.Unallocated : new Qcow2L2Entry(Volatile.Read(ref table[i]));
                if (KindOf(next) != kind ||
                    (kind is ClusterKind.DataCopied or ClusterKind.DataShared &&
                     next.HostOffset != entry.HostOffset + (long)(i - index) * _clusterSize))
                {
                    break;
                }
                length = Math.Min(length + _clusterSize, limit);
            }
        }
        var host = kind is ClusterKind.DataCopied or ClusterKind.DataShared ? entry.HostOffset + intra : 0;
        return new Mapping(kind, host, length, entry);
    }

    /// <summary>
    /// The L2 table for a guest offset without taking the metadata lock: null when the L1 entry is
    /// empty; false when the table is not cached (the caller loads it under the lock, outside its
    /// lock-free section, and retries).
    /// </summary>
    private bool TryGetL2LockFree(long guestOffset, out ulong[]? table)
    {
        var l1Index = (int)(guestOffset / L2Coverage);
        var l1 = new Qcow2L1Entry(Volatile.Read(ref _l1[l1Index]));
        if (!l1.IsAllocated)
        {
            table = null;
            return true;
        }
        table = _l2Cache.TryGet(l1.L2Offset);
        return table is not null;
    }

    /// <summary>Loads the L2 table covering <paramref name="guestOffset"/> (under the lock) and returns it for one immediate use.</summary>
    /// <summary>
    /// The L2 table for <paramref name="guestOffset"/> (null: none allocated), for a look at its entries'
    /// kinds only (block status). Data reads use <see cref="LoadL2ForReadAsync"/>.
    /// </summary>
    private async ValueTask<ulong[]?> LoadL2ForAsync(long guestOffset, CancellationToken cancellationToken)
    {
        var (table, parity) = await LoadL2ForReadAsync(guestOffset, cancellationToken).ConfigureAwait(false);
        ExitLockFree(parity);
        return table;
    }

    /// <summary>
    /// Loads the L2 table for <paramref name="guestOffset"/> (null: none allocated) and enters the
    /// lock-free section before the metadata lock goes, so that no drain can free a cluster the table
    /// names between the load and its use. The caller exits with the returned parity.
    /// </summary>
    private async ValueTask<(ulong[]? Table, int Parity)> LoadL2ForReadAsync(long guestOffset, CancellationToken cancellationToken)
    {
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            var l1 = new Qcow2L1Entry(_l1[(int)(guestOffset / L2Coverage)]);
            var table = l1.IsAllocated ? await LoadL2Async(l1.L2Offset, cancellationToken).ConfigureAwait(false) : null;
            return (table, EnterLockFree());
        }
        finally
        {
            _meta.Release();
        }
    }

    // ------------------------------------------------------------------ read

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        // Fast path, the common case: the L2 table is cached and the whole request maps to one run of
        // data clusters (or zeros). One lookup, one read of the data node, one async frame of our own.
        var parity = EnterLockFree();
        try
        {
            if (TryGetL2LockFree(offset, out var table))
            {
                var m = Map(table, offset, buffer.Length);
                if (m.Length == buffer.Length)
                {
                    switch (m.Kind)
                    {
                        case ClusterKind.DataCopied or ClusterKind.DataShared when m.HostOffset + m.Length <= _data.Length:
                            // QEMU raises read_aio on the file child before a data read (blkdebug reacts).
                            var ev = _file.DebugEventAsync(BlkdebugEvent.ReadAio);
                            var read = ev.IsCompletedSuccessfully
                                ? _data.ReadAsync(m.HostOffset, buffer, cancellationToken)
                                : ReadAfterEventAsync(ev, m.HostOffset, buffer, cancellationToken);
                            if (!read.IsCompletedSuccessfully)
                            {
                                var pending = FinishLockFreeAsync(read, parity);
                                parity = -1;
                                return pending;
                            }
                            read.GetAwaiter().GetResult();
                            return ValueTask.CompletedTask;
                        case ClusterKind.Zero:
                            buffer.Span.Clear();
                            return ValueTask.CompletedTask;
                    }
                }
            }
        }
        finally
        {
            if (parity >= 0)
            {
                ExitLockFree(parity);
            }
        }
        return ReadSlowAsync(offset, buffer, cancellationToken);
    }

    private async ValueTask ReadAfterEventAsync(ValueTask ev, long host, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        await ev.ConfigureAwait(false);
        await _data.ReadAsync(host, buffer, cancellationToken).ConfigureAwait(false);
    }

    [AsyncMethodBuilder(typeof(PoolingAsyncValueTaskMethodBuilder))]
    private async ValueTask FinishLockFreeAsync(ValueTask read, int parity)
    {
        try
        {
            await read.ConfigureAwait(false);
        }
        finally
        {
            ExitLockFree(parity);
        }
    }

    /// <summary>Any request: runs of different kinds, tables to load, backing reads, compressed clusters.</summary>
    private async ValueTask ReadSlowAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        var pos = 0;
        ulong[]? loaded = null;
        var haveLoaded = false;
        int? entered = null;
        while (pos < buffer.Length)
        {
            var parity = entered ?? EnterLockFree();
            entered = null;
            try
            {
                while (pos < buffer.Length)
                {
                    ulong[]? table;
                    if (haveLoaded)
                    {
                        table = loaded;
                        haveLoaded = false;
                    }
                    else if (!TryGetL2LockFree(offset + pos, out table))
                    {
                        break;
                    }
                    var m = Map(table, offset + pos, buffer.Length - pos);
                    await ReadMappedAsync(m, offset + pos, buffer.Slice(pos, m.Length), cancellationToken).ConfigureAwait(false);
                    pos += m.Length;
                }
            }
            finally
            {
                ExitLockFree(parity);
            }
            if (pos < buffer.Length)
            {
                (loaded, var p) = await LoadL2ForReadAsync(offset + pos, cancellationToken).ConfigureAwait(false);
                entered = p;
                haveLoaded = true;
            }
        }
    }

    private async ValueTask ReadMappedAsync(Mapping m, long guestOffset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        switch (m.Kind)
        {
            case ClusterKind.DataCopied or ClusterKind.DataShared:
                await _file.DebugEventAsync(BlkdebugEvent.ReadAio).ConfigureAwait(false);
                await ReadFileAsync(_data, m.HostOffset, destination, cancellationToken).ConfigureAwait(false);
                break;
            case ClusterKind.Zero:
                destination.Span.Clear();
                break;
            case ClusterKind.Unallocated:
                if (_backing is not null)
                {
                    await _file.DebugEventAsync(BlkdebugEvent.ReadBackingAio).ConfigureAwait(false);
                }
                await ReadBackingAsync(guestOffset, destination, cancellationToken).ConfigureAwait(false);
                break;
            case ClusterKind.Compressed:
                var cluster = ArrayPool<byte>.Shared.Rent(_clusterSize);
                try
                {
                    await _file.DebugEventAsync(BlkdebugEvent.ReadCompressed).ConfigureAwait(false);
                    await DecompressAsync(m.Entry, cluster.AsMemory(0, _clusterSize), cancellationToken).ConfigureAwait(false);
                    cluster.AsSpan((int)(guestOffset & (_clusterSize - 1)), destination.Length).CopyTo(destination.Span);
                }
                finally
                {
                    ArrayPool<byte>.Shared.Return(cluster);
                }
                break;
        }
    }

    /// <summary>Reads what the backing chain has at a guest offset; zeros past its end or without one.</summary>
    private async ValueTask ReadBackingAsync(long guestOffset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var available = _backing is null ? 0 : Math.Clamp(_backing.Length - guestOffset, 0, destination.Length);
        if (available > 0)
        {
            await _backing!.ReadAsync(guestOffset, destination[..(int)available], cancellationToken).ConfigureAwait(false);
        }
        destination.Span[(int)available..].Clear();
    }

    /// <summary>
    /// Inflates one compressed cluster. qcow2's "zlib" type is a raw deflate stream (no zlib header,
    /// 4 KiB window), which <see cref="DeflateStream"/> reads. The stream must yield a whole cluster.
    /// </summary>
    private async ValueTask DecompressAsync(Qcow2L2Entry entry, Memory<byte> destination, CancellationToken cancellationToken)
    {
        if (_headerCluster.Header.CompressionType != 0)
        {
            throw new BlockException("qcow2: unsupported compression type");
        }
        if (_hasDataFile)
        {
            // qcow2.txt: images with an external data file have no compressed clusters.
            throw new IOException($"qcow2: compressed cluster in '{Filename}', which has an external data file (image corrupt)");
        }
        var offset = entry.CompressedOffset(_clusterBits);
        var length = entry.CompressedLength(_clusterBits);
        var compressed = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            await ReadFileAsync(_file, offset, compressed.AsMemory(0, length), cancellationToken).ConfigureAwait(false);
            using var input = new MemoryStream(compressed, 0, length, writable: false);
            using var inflater = new DeflateStream(input, CompressionMode.Decompress);
            int n;
            try
            {
                n = inflater.ReadAtLeast(destination.Span, destination.Length, throwOnEndOfStream: false);
            }
            catch (InvalidDataException e)
            {
                throw new IOException($"qcow2: corrupt compressed cluster at offset {offset} in '{Filename}'", e);
            }
            if (n != destination.Length)
            {
                throw new IOException($"qcow2: compressed cluster at offset {offset} in '{Filename}' is truncated");
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(compressed);
        }
    }

    /// <summary>What a guest cluster reads as now (the source for copy-on-write), into a cluster-sized buffer.</summary>
    private async ValueTask ReadClusterSourceAsync(long guestClusterOffset, Qcow2L2Entry entry, Memory<byte> destination,
        CancellationToken cancellationToken)
    {
        switch (KindOf(entry))
        {
            case ClusterKind.DataCopied or ClusterKind.DataShared:
                await ReadFileAsync(_data, entry.HostOffset, destination, cancellationToken).ConfigureAwait(false);
                break;
            case ClusterKind.Compressed:
                await DecompressAsync(entry, destination, cancellationToken).ConfigureAwait(false);
                break;
            case ClusterKind.Zero:
                destination.Span.Clear();
                break;
            default:
                await ReadBackingAsync(guestClusterOffset, destination, cancellationToken).ConfigureAwait(false);
                break;
        }
    }

    // ------------------------------------------------------------------ write

    protected override async ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        var pos = await WriteInPlaceAsync(offset, data, cancellationToken).ConfigureAwait(false);
        while (pos < data.Length)
        {
            // The rest needs allocation or copy-on-write somewhere: one L2 table at a time.
            var guest = offset + pos;
            var chunk = (int)Math.Min(data.Length - pos, (guest / L2Coverage + 1) * L2Coverage - guest);
            await WriteAllocatingAsync(guest, data.Slice(pos, chunk), cancellationToken).ConfigureAwait(false);
            pos += chunk;
        }
        if ((flags & WriteFlags.Fua) != 0)
        {
            await FlushFilesAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// Writes the leading part of a request that lands on clusters this image owns exclusively, without
    /// the metadata lock. Returns how many bytes it wrote; the rest needs allocation.
    /// </summary>
    private async ValueTask<int> WriteInPlaceAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        var pos = 0;
        var parity = EnterLockFree();
        try
        {
            while (pos < data.Length)
            {
                if (!TryGetL2LockFree(offset + pos, out var table) || table is null)
                {
                    break;
                }
                var m = Map(table, offset + pos, data.Length - pos);
                if (m.Kind != ClusterKind.DataCopied)
                {
                    break;
                }
                await _file.DebugEventAsync(BlkdebugEvent.WriteAio).ConfigureAwait(false);
                await _data.WriteAsync(m.HostOffset, data.Slice(pos, m.Length), WriteFlags.None, cancellationToken).ConfigureAwait(false);
                pos += m.Length;
            }
        }
        finally
        {
            ExitLockFree(parity);
        }
        return pos;
    }

    /// <summary>The entry <paramref name="old"/> was replaced: its host clusters lose a reference (after the next flush).</summary>
    private void DropReference(Qcow2L2Entry old, long keep)
    {
        if (_hasDataFile)
        {
            // Clusters of an external data file are not refcounted.
            return;
        }
        if (old.IsCompressed)
        {
            FreeCompressedLater(old);
        }
        else if (old.HostOffset != 0 && old.HostOffset != keep)
        {
            FreeLater(old.HostOffset);
        }
    }

    // ------------------------------------------------------------------ write zeroes and discard

    protected override async ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        if (_dataFileRaw)
        {
            // The data file must read as the guest sees it, so the zeros go there. The mapping need not
            // change: mapped clusters now hold zeros, unmapped and zero-flagged ones read as zeros anyway.
            await _data.WriteZeroesAsync(offset, length, flags & ~WriteFlags.Fua, cancellationToken).ConfigureAwait(false);
            if ((flags & WriteFlags.Fua) != 0)
            {
                await FlushFilesAsync(cancellationToken).ConfigureAwait(false);
            }
            return;
        }
        var end = offset + length;
        var alignedStart = AlignUp(offset);
        var alignedEnd = end == _virtualSize ? AlignUp(end) : AlignDown(end);
        if (alignedStart >= alignedEnd)
        {
            await ZeroPartialAsync(offset, length, flags, cancellationToken).ConfigureAwait(false);
            return;
        }
        if (alignedStart > offset)
        {
            await ZeroPartialAsync(offset, alignedStart - offset, flags, cancellationToken).ConfigureAwait(false);
        }
        var unmap = (flags & WriteFlags.MayUnmap) != 0;
        if (IsV3 || (unmap && _backing is null))
        {
            await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
            try
            {
                await ChangeClustersAsync(alignedStart, alignedEnd - alignedStart,
                    // v2 has no zero flag; without a backing file an unallocated cluster reads as zeros too.
                    IsV3 ? Qcow2L2Entry.Zero : Qcow2L2Entry.Unallocated, keepAllocation: !unmap, cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                _meta.Release();
            }
        }
        else
        {
            await ZeroPartialAsync(alignedStart, Math.Min(alignedEnd, end) - alignedStart, flags, cancellationToken).ConfigureAwait(false);
        }
        if (alignedEnd < end)
        {
            await ZeroPartialAsync(alignedEnd, end - alignedEnd, flags, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>Zeroes by writing zero buffers, skipping clusters that already read as zeros.</summary>
    private async ValueTask ZeroPartialAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        var zeros = ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            Array.Clear(zeros, 0, _clusterSize);
            var end = offset + length;
            while (offset < end)
            {
                var n = (int)Math.Min(_clusterSize - (offset & (_clusterSize - 1)), end - offset);
                if (!await ReadsAsZerosAsync(offset, cancellationToken).ConfigureAwait(false))
                {
                    if ((flags & WriteFlags.NoFallback) != 0)
                    {
                        throw LibC.ErrnoException(LibC.EOPNOTSUPP);
                    }
                    await WriteCoreAsync(offset, zeros.AsMemory(0, n), WriteFlags.None, cancellationToken).ConfigureAwait(false);
                }
                offset += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(zeros);
        }
    }

    /// <summary>True when the whole cluster at <paramref name="guestOffset"/> is known to read as zeros without looking at data.</summary>
    private async ValueTask<bool> ReadsAsZerosAsync(long guestOffset, CancellationToken cancellationToken)
    {
        if (!TryGetL2LockFree(guestOffset, out var table))
        {
            table = await LoadL2ForAsync(guestOffset, cancellationToken).ConfigureAwait(false);
        }
        var m = Map(table, guestOffset & ~(long)(_clusterSize - 1), _clusterSize);
        return m.Kind == ClusterKind.Zero ||
               (m.Kind == ClusterKind.Unallocated && (_backing is null || _backing.Length <= (guestOffset & ~(long)(_clusterSize - 1))));
    }

    protected override async ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        if (_dataFileRaw)
        {
            // Dropping the mapping would break the raw data file's promise; discard its blocks instead.
            await _data.DiscardAsync(offset, length, cancellationToken).ConfigureAwait(false);
            return;
        }
        // Only whole clusters can be dropped; a discard is a hint, so the partial ends stay as they are.
        var start = AlignUp(offset);
        var end = offset + length == _virtualSize ? AlignUp(offset + length) : AlignDown(offset + length);
        if (start >= end)
        {
            return;
        }
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            // With a backing file a discarded cluster must not show the backing data again: v3 makes it
            // a zero cluster; v2 cannot, and falls back to the backing data as QEMU does.
            var replacement = IsV3 && _backing is not null ? Qcow2L2Entry.Zero : Qcow2L2Entry.Unallocated;
            await ChangeClustersAsync(start, end - start, replacement, keepAllocation: false, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _meta.Release();
        }
    }

    /// <summary>
    /// Sets whole clusters to <paramref name="replacement"/> (zero or unallocated), dropping their host
    /// clusters unless <paramref name="keepAllocation"/> lets an owned cluster stay preallocated under
    /// the zero flag. Metadata lock held.
    /// </summary>
    private async ValueTask ChangeClustersAsync(long offset, long length, Qcow2L2Entry replacement, bool keepAllocation,
        CancellationToken cancellationToken)
    {
        var end = offset + length;
        while (offset < end)
        {
            var l1Index = (int)(offset / L2Coverage);
            var chunkEnd = Math.Min(end, (l1Index + 1) * L2Coverage);
            var l1 = new Qcow2L1Entry(_l1[l1Index]);
            if (!l1.IsAllocated && replacement == Qcow2L2Entry.Unallocated)
            {
                offset = chunkEnd;
                continue;
            }
            // Allocating writes in flight on these clusters finish first; their entries are then final.
            await WaitForInFlightLockedAsync(offset >> _clusterBits, (chunkEnd + _clusterSize - 1) >> _clusterBits, cancellationToken)
                .ConfigureAwait(false);
            var (table, l2Offset) = await GetL2ForUpdateAsync(l1Index, cancellationToken).ConfigureAwait(false);
            var first = (int)((offset >> _clusterBits) & (_l2Entries - 1));
            var count = (int)((chunkEnd - offset + _clusterSize - 1) >> _clusterBits);
            var changed = false;
            var toDrop = new List<Qcow2L2Entry>();
            for (var i = first; i < first + count; i++)
            {
                var old = new Qcow2L2Entry(Volatile.Read(ref table[i]));
                Qcow2L2Entry next;
                if (replacement.IsZero && keepAllocation && old.IsCopied && HasHostCluster(old))
                {
                    next = new Qcow2L2Entry(old.Raw | Qcow2L2Entry.ZeroFlag);
                }
                else
                {
                    next = replacement;
                    toDrop.Add(old);
                }
                if (next != old)
                {
                    Volatile.Write(ref table[i], next.Raw);
                    changed = true;
                }
            }
            if (changed)
            {
                await WriteL2EntriesAsync(l2Offset, table, first, count, cancellationToken).ConfigureAwait(false);
            }
            foreach (var old in toDrop)
            {
                DropReference(old, keep: 0);
            }
            offset = chunkEnd;
        }
        await ProcessPendingFreesIfManyAsync(cancellationToken).ConfigureAwait(false);
    }

    private long AlignUp(long v) => (v + _clusterSize - 1) & ~(long)(_clusterSize - 1);

    private long AlignDown(long v) => v & ~(long)(_clusterSize - 1);

    // ------------------------------------------------------------------ flush and block status

    protected override async ValueTask FlushCoreAsync(CancellationToken cancellationToken)
    {
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            await ProcessPendingFreesAsync(cancellationToken).ConfigureAwait(false);
            // A flushed image is one qemu-img check finds clean, even if the process dies right after
            // (kill -9): the unused reserve would otherwise show up as leaked clusters.
            await ReleaseReserveAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _meta.Release();
        }
        await FlushFilesAsync(cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// Makes what was written durable. FUA writes need only this: metadata is written before the request
    /// completes, and giving back the reserve on each of them would churn it.
    /// </summary>
    private async ValueTask FlushFilesAsync(CancellationToken cancellationToken)
    {
        if (_hasDataFile)
        {
            await _data.FlushAsync(cancellationToken).ConfigureAwait(false);
        }
        await _file.FlushAsync(cancellationToken).ConfigureAwait(false);
    }

    protected override async ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        // Runs of the same kind are merged across L2 tables, up to the requested length.
        ClusterKind? kind = null;
        long done = 0;
        while (done < length)
        {
            if (!TryGetL2LockFree(offset + done, out var table))
            {
                table = await LoadL2ForAsync(offset + done, cancellationToken).ConfigureAwait(false);
            }
            var m = Map(table, offset + done, length - done);
            var k = m.Kind is ClusterKind.DataShared or ClusterKind.Compressed ? ClusterKind.DataCopied : m.Kind;
            if (kind is not null && k != kind)
            {
                break;
            }
            kind = k;
            done += m.Length;
        }
        switch (kind)
        {
            case ClusterKind.Zero:
                return new BlockStatus(done, BlockStatusFlags.Zero | BlockStatusFlags.Allocated, 1);
            case ClusterKind.DataCopied:
                return new BlockStatus(done, BlockStatusFlags.Data | BlockStatusFlags.Allocated, 1);
        }
        if (_backing is null || offset >= _backing.Length)
        {
            return new BlockStatus(done, BlockStatusFlags.Zero, 0);
        }
        var below = await _backing.GetBlockStatusAsync(offset, done, cancellationToken).ConfigureAwait(false);
        var depth = below.Depth == 0 ? 0 : below.Depth + 1;
        return new BlockStatus(Math.Clamp(below.Length, 1, done), below.Flags & ~BlockStatusFlags.Allocated, depth);
    }
}
