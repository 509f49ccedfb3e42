using System.Buffers;
using System.IO.Compression;
using Backup.Block.Posix;

namespace Backup.Block.Drivers.Qcow2;

// Compressed cluster writes (qcow2.txt "Compressed Clusters Descriptor"), as QEMU's
// qcow2_co_pwritev_compressed_part: whole clusters, raw deflate, only where it saves space, and only
// into clusters that hold no data yet. Compressed data of several clusters is packed into shared host
// clusters at byte granularity (QEMU's qcow2_alloc_bytes); each host cluster holds one reference per
// compressed cluster whose sectors touch it, which is what qemu-img check counts.
public sealed partial class Qcow2Node
{
    /// <summary>
    /// The next free byte of the host cluster compressed data is packed into, or 0 for none (QEMU's
    /// free_byte_offset). Metadata lock held.
    /// </summary>
    private long _compressedFree;

    /// <summary>
    /// zlib (compression type 0) only; zstd images are read but not written compressed. Not with an
    /// external data file: compressed clusters live in the image file, which such images never map (QEMU: ENOTSUP).
    /// </summary>
    public override bool SupportsCompressedWrites => !ReadOnly && !_hasDataFile && _headerCluster.Header.CompressionType == 0;

    protected override async ValueTask WriteCompressedCoreAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        // QEMU: EINVAL for anything but whole aligned clusters, except the image's last cluster.
        if ((offset & (_clusterSize - 1)) != 0 || (data.Length % _clusterSize != 0 && offset + data.Length != _virtualSize))
        {
            throw LibC.ErrnoException(LibC.EINVAL);
        }
        var padded = ArrayPool<byte>.Shared.Rent(_clusterSize);
        var compressed = ArrayPool<byte>.Shared.Rent(_clusterSize);
        try
        {
            for (var pos = 0; pos < data.Length; pos += _clusterSize)
            {
                var n = Math.Min(_clusterSize, data.Length - pos);
                var cluster = data.Slice(pos, n);
                if (n < _clusterSize)
                {
                    // The image's last, partial cluster is compressed padded with zeros, as QEMU does.
                    cluster.Span.CopyTo(padded);
                    padded.AsSpan(n, _clusterSize - n).Clear();
                    cluster = padded.AsMemory(0, _clusterSize);
                }
                // Compressed data must be smaller than a cluster by at least a byte to be worth it (QEMU's limit).
                var size = Deflate(cluster.Span, compressed, _clusterSize - 1);
                if (size < 0)
                {
                    await WriteCoreAsync(offset + pos, data.Slice(pos, n), WriteFlags.None, cancellationToken).ConfigureAwait(false);
                    continue;
                }
                await _meta.WaitAsync(cancellationToken).ConfigureAwait(false);
                try
                {
                    await StoreCompressedAsync(offset + pos, compressed.AsMemory(0, size), cancellationToken).ConfigureAwait(false);
                }
                finally
                {
                    _meta.Release();
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(compressed);
            ArrayPool<byte>.Shared.Return(padded);
        }
    }

    /// <summary>
    /// Raw deflate of one cluster into <paramref name="destination"/>'s first <paramref name="capacity"/>
    /// bytes; -1 when it does not fit. QEMU deflates with a 4 KiB window and inflates with one, but inflates
    /// a whole cluster in one call into one buffer, so matches further back (DeflateStream's 32 KiB window)
    /// are read from that buffer: QEMU reads these clusters (the integration test checks with qemu-img compare).
    /// </summary>
    private static int Deflate(ReadOnlySpan<byte> source, byte[] destination, int capacity)
    {
        var sink = new BoundedSink(destination, capacity);
        using (var deflate = new DeflateStream(sink, CompressionLevel.Optimal, leaveOpen: true))
        {
            deflate.Write(source);
        }
        return sink.Overflowed ? -1 : (int)sink.Length;
    }

    /// <summary>Points the L2 entry of one guest cluster at newly written compressed data. Metadata lock held.</summary>
    private async ValueTask StoreCompressedAsync(long guestOffset, ReadOnlyMemory<byte> compressed, CancellationToken cancellationToken)
    {
        var l1Index = (int)(guestOffset / L2Coverage);
        // An allocating write in flight on this cluster publishes its entry first: it must see ours, not
        // overwrite it (the packed data's reference would leak).
        await WaitForInFlightLockedAsync(guestOffset >> _clusterBits, (guestOffset >> _clusterBits) + 1, cancellationToken)
            .ConfigureAwait(false);
        var (table, l2Offset) = await GetL2ForUpdateAsync(l1Index, cancellationToken).ConfigureAwait(false);
        var index = (int)((guestOffset >> _clusterBits) & (_l2Entries - 1));
        var old = new Qcow2L2Entry(Volatile.Read(ref table[index]));
        if (old.IsCompressed || old.HostOffset != 0)
        {
            // QEMU (qcow2_alloc_compressed_cluster_offset): compression can't overwrite anything.
            throw LibC.ErrnoException(LibC.EIO);
        }
        var host = await AllocateCompressedBytesAsync(compressed.Length, cancellationToken).ConfigureAwait(false);
        // Data first, then the entry that points at it.
        await _file.DebugEventAsync(BlkdebugEvent.WriteCompressed).ConfigureAwait(false);
        await _file.WriteAsync(host, compressed, WriteFlags.None, cancellationToken).ConfigureAwait(false);
        var x = 62 - (_clusterBits - 8);
        // The descriptor stores the number of 512-byte sectors touched, less one.
        var extraSectors = (ulong)((host + compressed.Length - 1) / 512 - host / 512);
        var entry = Qcow2L2Entry.Compressed | (extraSectors << x) | (ulong)host;
        Volatile.Write(ref table[index], entry);
        await WriteL2EntriesAsync(l2Offset, table, index, 1, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// Room for <paramref name="size"/> bytes of compressed data (QEMU's qcow2_alloc_bytes): in the
    /// current packing cluster if they fit, else in a fresh cluster, continuing across the boundary when
    /// the fresh cluster follows the current one. A cluster from the reserve comes with refcount 1, the
    /// reference of the first compressed cluster in it; every further one adds a reference, durable
    /// before the L2 entry is written.
    /// </summary>
    private async ValueTask<long> AllocateCompressedBytesAsync(int size, CancellationToken cancellationToken)
    {
        var free = _compressedFree;
        var used = free & (_clusterSize - 1);
        var open = free != 0 && used != 0;
        long start;
        if (open && _clusterSize - used >= size)
        {
            start = free;
            await UpdateRefcountsAsync([free >> _clusterBits], +1, cancellationToken, WriteFlags.Fua).ConfigureAwait(false);
        }
        else
        {
            var fresh = await AllocateClusterAsync(cancellationToken).ConfigureAwait(false);
            if (open && fresh == free - used + _clusterSize)
            {
                start = free;
                await UpdateRefcountsAsync([free >> _clusterBits], +1, cancellationToken, WriteFlags.Fua).ConfigureAwait(false);
            }
            else
            {
                start = fresh;
            }
        }
        _compressedFree = start + size;
        return start;
    }

    /// <summary>
    /// A cluster lost a reference: stop packing into it, since once its refcount reaches 0 it may be
    /// handed out for other data. Called for every pending free as it is processed.
    /// </summary>
    private void ForgetCompressedCluster(long cluster)
    {
        if (_compressedFree != 0 && (_compressedFree - 1) >> _clusterBits == cluster)
        {
            _compressedFree = 0;
        }
    }

    /// <summary>A write-only stream over a caller's buffer that records overflow instead of throwing (incompressible data is common).</summary>
    private sealed class BoundedSink(byte[] buffer, int capacity) : Stream
    {
        private int _length;

        public bool Overflowed { get; private set; }

        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => _length;
        public override long Position { get => _length; set => throw new NotSupportedException(); }

        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

        public override void Write(ReadOnlySpan<byte> data)
        {
            if (Overflowed || _length + data.Length > capacity)
            {
                Overflowed = true;
                return;
            }
            data.CopyTo(buffer.AsSpan(_length));
            _length += data.Length;
        }

        public override void Flush()
        {
        }

        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
    }
}
