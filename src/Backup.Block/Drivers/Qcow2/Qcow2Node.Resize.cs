using System.Buffers.Binary;
using Backup.Block.Bitmaps;

namespace Backup.Block.Drivers.Qcow2;

// block_resize of a qcow2 image (QEMU's qcow2_co_truncate with preallocation off), under the metadata
// lock, in an order that a crash at any point leaves the old or the new image and at worst leaked clusters:
// - grow: a new L1 table in fresh clusters (refcounts durable first), written durably; then the header
//   switches to it (l1_size and l1_table_offset in one 12-byte write); the old table is freed after the
//   next flush; then the header's size. The new area reads as zeros (QEMU: zero clusters where a longer
//   backing file would show through).
// - shrink: clusters past the new end are dropped from their L2 tables, L1 entries past the end are
//   cleared (the L1 size stays, as in QEMU) and their L2 tables freed; then the header's size.
// The image's dirty bitmaps follow in BlockNode.TruncateAsync; persistent ones are stored with the new
// size at close. Images whose stored bitmaps are not all usable in memory are refused, as QEMU does.
public sealed partial class Qcow2Node
{
    /// <summary>QEMU's QCOW_MAX_L1_SIZE: 32 MiB of L1 table.</summary>
    private const int MaxL1Entries = (32 << 20) / 8;

    /// <summary>Offsets of the header fields a resize changes (qcow2.txt "Header").</summary>
    private const int HeaderSizeOffset = 24, HeaderL1SizeOffset = 36;

    protected override async ValueTask TruncateCoreAsync(long length, CancellationToken cancellationToken)
    {
        if (length % 512 != 0)
        {
            throw new BlockException("The new size must be a multiple of 512");
        }
        if (_headerCluster.Header.NbSnapshots != 0)
        {
            throw new BlockException("Can't resize an image which has snapshots");
        }
        CheckBitmapsAllowResize();
        var old = Length;
        if (length < old && (length & (_clusterSize - 1)) != 0)
        {
            // The last cluster stays mapped; zero its part past the new end so that a later grow does not
            // bring the cut data back (QEMU leaves it; zeros are what a grown area must read as).
            await WriteZeroesCoreAsync(length, Math.Min(AlignUp(length), old) - length, WriteFlags.None, cancellationToken)
                .ConfigureAwait(false);
        }
        await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            var l1Needed = (length + L2Coverage - 1) / L2Coverage;
            if (length < old)
            {
                await ChangeClustersAsync(AlignUp(length), AlignUp(old) - AlignUp(length), Qcow2L2Entry.Unallocated,
                    keepAllocation: false, cancellationToken).ConfigureAwait(false);
                await ShrinkL1Async((int)l1Needed, cancellationToken).ConfigureAwait(false);
            }
            else if (l1Needed > _l1.Length)
            {
                if (l1Needed > MaxL1Entries)
                {
                    throw new BlockException("Failed to grow the L1 table: File too large");
                }
                await GrowL1Async((int)l1Needed, cancellationToken).ConfigureAwait(false);
            }
            await WriteHeaderSizeAsync(length, cancellationToken).ConfigureAwait(false);
            await ProcessPendingFreesAsync(cancellationToken).ConfigureAwait(false);
            if (_hasDataFile)
            {
                // As QEMU: an external data file is resized with the image.
                await _data.TruncateAsync(length, cancellationToken).ConfigureAwait(false);
            }
        }
        finally
        {
            _meta.Release();
        }
        if (length > old && _backing is not null && _backing.Length > old)
        {
            // Without this the grown area would show the backing file's data (QEMU's BDRV_REQ_ZERO_WRITE).
            await WriteZeroesCoreAsync(old, Math.Min(length, _backing.Length) - old, WriteFlags.None, cancellationToken)
                .ConfigureAwait(false);
        }
    }

    /// <summary>
    /// QEMU's qcow2_truncate_bitmaps_check: every stored bitmap must be in memory (loaded) and usable, so
    /// that the in-memory bitmap can follow the size and be stored again at close.
    /// </summary>
    private void CheckBitmapsAllowResize()
    {
        var set = this.TryGetDirtyBitmaps();
        foreach (var entry in _bitmapDirectory)
        {
            var bitmap = set?.Find(entry.Name)
                ?? throw new BlockException("Cannot resize qcow2 with persistent bitmaps that were not loaded into memory");
            bitmap.Check(BitmapCheck.Default);
        }
        if (set?.Bitmaps.FirstOrDefault(b => b.CrashTracker is not null) is { } tracked)
        {
            // Our extension: its journal covers the disk at a fixed size.
            throw new BlockException($"Cannot resize qcow2 with crash-consistent bitmap '{tracked.Name}'");
        }
    }

    /// <summary>Moves the L1 table to new clusters with room for <paramref name="entries"/> entries.</summary>
    private async ValueTask GrowL1Async(int entries, CancellationToken cancellationToken)
    {
        var oldTable = _l1;
        var oldOffset = _l1Offset;
        var bytes = (long)entries * 8;
        var clusters = (int)((bytes + _clusterSize - 1) >> _clusterBits);
        await _file.DebugEventAsync(BlkdebugEvent.L1GrowAllocTable).ConfigureAwait(false);
        var offset = await AllocateContiguousAsync(clusters, cancellationToken).ConfigureAwait(false);
        var table = new ulong[entries];
        var image = new byte[(long)clusters << _clusterBits];
        for (var i = 0; i < oldTable.Length; i++)
        {
            table[i] = Volatile.Read(ref oldTable[i]);
            BinaryPrimitives.WriteUInt64BigEndian(image.AsSpan(i * 8), table[i]);
        }
        await _file.DebugEventAsync(BlkdebugEvent.L1GrowWriteTable).ConfigureAwait(false);
        await _file.WriteAsync(offset, image, WriteFlags.Fua, cancellationToken).ConfigureAwait(false);

        await _file.DebugEventAsync(BlkdebugEvent.L1GrowActivateTable).ConfigureAwait(false);
        var field = new byte[12];
        BinaryPrimitives.WriteUInt32BigEndian(field, (uint)entries);
        BinaryPrimitives.WriteUInt64BigEndian(field.AsSpan(4), (ulong)offset);
        await _file.WriteAsync(HeaderL1SizeOffset, field, WriteFlags.Fua, cancellationToken).ConfigureAwait(false);
        Volatile.Write(ref _l1, table);
        _l1Offset = offset;
        _headerCluster = _headerCluster with
        {
            Header = _headerCluster.Header with { L1Size = (uint)entries, L1TableOffset = (ulong)offset },
        };
        if (oldTable.Length > 0)
        {
            foreach (var c in ClusterRun(oldOffset, oldTable.Length * 8L))
            {
                FreeLater(c);
            }
        }
    }

    /// <summary>Clears the L1 entries from <paramref name="entries"/> on (durably) and frees their L2 tables.</summary>
    private async ValueTask ShrinkL1Async(int entries, CancellationToken cancellationToken)
    {
        var table = _l1;
        if (entries >= table.Length)
        {
            return;
        }
        await _file.DebugEventAsync(BlkdebugEvent.L1ShrinkWriteTable).ConfigureAwait(false);
        await _file.WriteZeroesAsync(_l1Offset + entries * 8L, (table.Length - entries) * 8L, WriteFlags.Fua, cancellationToken)
            .ConfigureAwait(false);
        await _file.DebugEventAsync(BlkdebugEvent.L1ShrinkFreeL2Clusters).ConfigureAwait(false);
        for (var i = entries; i < table.Length; i++)
        {
            var l1 = new Qcow2L1Entry(Volatile.Read(ref table[i]));
            Volatile.Write(ref table[i], 0);
            if (l1.IsAllocated)
            {
                FreeLater(l1.L2Offset);
            }
        }
    }

    /// <summary>The header's size field, durably, then the node's.</summary>
    private async ValueTask WriteHeaderSizeAsync(long length, CancellationToken cancellationToken)
    {
        var field = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(field, (ulong)length);
        await _file.WriteAsync(HeaderSizeOffset, field, WriteFlags.Fua, cancellationToken).ConfigureAwait(false);
        _headerCluster = _headerCluster with { Header = _headerCluster.Header with { Size = (ulong)length } };
        Volatile.Write(ref _virtualSize, length);
    }
}
