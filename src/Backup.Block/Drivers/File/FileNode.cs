using System.Buffers;
using System.Runtime.InteropServices;
using Backup.Block.Permissions;
using Backup.Block.Posix;
using Microsoft.Win32.SafeHandles;

namespace Backup.Block.Drivers.File;

/// <summary>
/// A host file through positional I/O on one <see cref="SafeFileHandle"/>: no shared file position, so
/// any number of requests run at once. With cache.direct the file is opened O_DIRECT and requests go
/// through aligned bounce buffers.
/// </summary>
public sealed class FileNode : BlockNode
{
    /// <summary>O_DIRECT needs offsets, lengths and buffers aligned to the logical block size; 4 KiB covers every device.</summary>
    public const int DirectAlignment = 4096;

    private const int ZeroChunk = 1 << 20;

    private readonly SafeFileHandle _handle;
    private readonly SemaphoreSlim _directRmw = new(1, 1);
    private readonly FileLocks? _locks;
    private long _length;

    internal FileNode(NodeContext context, string filename, SafeFileHandle handle, bool locking) : base(context)
    {
        Filename = filename;
        _handle = handle;
        _length = RandomAccess.GetLength(handle);
        _locks = locking ? new FileLocks(handle, filename) : null;
    }

    /// <summary>True when the node takes QEMU's image locks (locking=on, or auto where OFD locks work).</summary>
    public bool Locking => _locks is not null;

    /// <summary>The lock bytes the node holds now: permissions (100 + bit) and refused shares (200 + bit).</summary>
    public (BlockPermissions Perm, BlockPermissions Unshared) LockBytes => _locks?.Held ?? default;

    protected override void OnPreparePermissions(BlockPermissions perm, BlockPermissions shared) =>
        _locks?.Prepare(perm, shared);

    protected override void OnCommitPermissions(BlockPermissions perm, BlockPermissions shared) =>
        _locks?.Commit(perm, shared);

    protected override void OnAbortPermissions() => _locks?.Abort();

    public override string DriverName => "file";

    public override string Filename { get; }

    public override long Length => Interlocked.Read(ref _length);

    protected override bool IsGrowable => true;

    protected override async ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        if (CacheDirect)
        {
            await DirectReadAsync(offset, buffer, cancellationToken).ConfigureAwait(false);
            return;
        }
        var done = 0;
        while (done < buffer.Length)
        {
            var n = await RandomAccess.ReadAsync(_handle, buffer[done..], offset + done, cancellationToken).ConfigureAwait(false);
            if (n == 0)
            {
                // Past the end of the file reads as zeros, as with QEMU's file driver.
                buffer.Span[done..].Clear();
                return;
            }
            done += n;
        }
    }

    protected override async ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        if (CacheDirect)
        {
            await DirectWriteAsync(offset, data, cancellationToken).ConfigureAwait(false);
        }
        else if ((flags & WriteFlags.Fua) != 0)
        {
            // FUA makes this write durable, not every other dirty page of the file: pwritev2(RWF_DSYNC)
            // syncs only its range, where write + fdatasync would write back the whole file's cache.
            await WriteDurableAsync(offset, data, cancellationToken).ConfigureAwait(false);
            GrowTo(offset + data.Length);
            return;
        }
        else
        {
            await RandomAccess.WriteAsync(_handle, data, offset, cancellationToken).ConfigureAwait(false);
        }
        GrowTo(offset + data.Length);
        if ((flags & WriteFlags.Fua) != 0)
        {
            await FlushCoreAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    private async ValueTask WriteDurableAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        byte[]? rented = null;
        if (!MemoryMarshal.TryGetArray(data, out var segment))
        {
            rented = ArrayPool<byte>.Shared.Rent(data.Length);
            data.CopyTo(rented);
            segment = new ArraySegment<byte>(rented, 0, data.Length);
        }
        try
        {
            var err = await Task.Run(() => LibC.WriteDurable(_handle, segment.Array!, segment.Offset, segment.Count, offset), cancellationToken)
                .ConfigureAwait(false);
            if (err == LibC.EOPNOTSUPP || err == LibC.EINVAL)
            {
                // A kernel or file system without RWF_DSYNC: the portable way.
                await RandomAccess.WriteAsync(_handle, data, offset, cancellationToken).ConfigureAwait(false);
                await FlushCoreAsync(cancellationToken).ConfigureAwait(false);
            }
            else if (err != 0)
            {
                throw LibC.ErrnoException(err);
            }
        }
        finally
        {
            if (rented is not null)
            {
                ArrayPool<byte>.Shared.Return(rented);
            }
        }
    }

    protected override async ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        var mode = (flags & WriteFlags.MayUnmap) != 0
            ? LibC.FALLOC_FL_PUNCH_HOLE | LibC.FALLOC_FL_KEEP_SIZE
            : LibC.FALLOC_FL_ZERO_RANGE;
        if (offset + length > Length && mode != LibC.FALLOC_FL_ZERO_RANGE)
        {
            // Punching a hole never extends a file; make it long enough first.
            await TruncateCoreAsync(offset + length, cancellationToken).ConfigureAwait(false);
        }
        var err = LibC.Fallocate(_handle, mode, offset, length);
        if (err != 0 && mode != LibC.FALLOC_FL_ZERO_RANGE)
        {
            err = LibC.Fallocate(_handle, LibC.FALLOC_FL_ZERO_RANGE, offset, length);
        }
        if (err == 0)
        {
            GrowTo(offset + length);
            return;
        }
        if (err != LibC.EOPNOTSUPP && err != LibC.EINVAL)
        {
            throw LibC.ErrnoException(err);
        }
        if ((flags & WriteFlags.NoFallback) != 0)
        {
            throw LibC.ErrnoException(LibC.EOPNOTSUPP);
        }
        await WriteZeroBuffersAsync(offset, length, cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask WriteZeroBuffersAsync(long offset, long length, CancellationToken cancellationToken)
    {
        var chunk = (int)Math.Min(ZeroChunk, length);
        var buffer = ArrayPool<byte>.Shared.Rent(chunk);
        try
        {
            Array.Clear(buffer, 0, chunk);
            for (long done = 0; done < length;)
            {
                var n = (int)Math.Min(chunk, length - done);
                await WriteCoreAsync(offset + done, buffer.AsMemory(0, n), WriteFlags.None, cancellationToken).ConfigureAwait(false);
                done += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        var end = Math.Min(offset + length, Length);
        if (end > offset)
        {
            // A discard is a hint: a file system that cannot punch holes simply keeps the data.
            _ = LibC.Fallocate(_handle, LibC.FALLOC_FL_PUNCH_HOLE | LibC.FALLOC_FL_KEEP_SIZE, offset, end - offset);
        }
        return ValueTask.CompletedTask;
    }

    protected override async ValueTask FlushCoreAsync(CancellationToken cancellationToken) =>
        await Task.Run(() => LibC.DataSync(_handle), cancellationToken).ConfigureAwait(false);

    protected override ValueTask TruncateCoreAsync(long length, CancellationToken cancellationToken)
    {
        RandomAccess.SetLength(_handle, length);
        Interlocked.Exchange(ref _length, length);
        return ValueTask.CompletedTask;
    }

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        // Protocol nodes own all their data: everything is "allocated" here; holes read as zeros.
        const BlockStatusFlags data = BlockStatusFlags.Data | BlockStatusFlags.Allocated;
        const BlockStatusFlags hole = BlockStatusFlags.Zero | BlockStatusFlags.Allocated;
        var next = LibC.Seek(_handle, offset, LibC.SEEK_DATA);
        if (next == -LibC.ENXIO)
        {
            return ValueTask.FromResult(new BlockStatus(length, hole));
        }
        if (next < 0)
        {
            return ValueTask.FromResult(new BlockStatus(length, data));
        }
        if (next > offset)
        {
            return ValueTask.FromResult(new BlockStatus(Math.Min(length, next - offset), hole));
        }
        var holeAt = LibC.Seek(_handle, offset, LibC.SEEK_HOLE);
        var dataLength = holeAt > offset ? Math.Min(length, holeAt - offset) : length;
        return ValueTask.FromResult(new BlockStatus(dataLength, data));
    }

    public override ImageInfo GetImageInfo() => new()
    {
        Filename = Filename,
        Format = "file",
        VirtualSize = Length,
        ActualSize = LibC.AllocatedBytes(_handle),
    };

    public override ValueTask CloseAsync()
    {
        _handle.Dispose();
        _directRmw.Dispose();
        return ValueTask.CompletedTask;
    }

    private void GrowTo(long end)
    {
        long current;
        while (end > (current = Interlocked.Read(ref _length)))
        {
            if (Interlocked.CompareExchange(ref _length, end, current) == current)
            {
                return;
            }
        }
    }

    // ------------------------------------------------------------------ O_DIRECT

    private async ValueTask DirectReadAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        var start = AlignDown(offset);
        var end = AlignUp(offset + buffer.Length);
        using var bounce = new AlignedBuffer((int)(end - start), DirectAlignment);
        await ReadAlignedAsync(start, bounce.Memory, cancellationToken).ConfigureAwait(false);
        bounce.Memory.Span.Slice((int)(offset - start), buffer.Length).CopyTo(buffer.Span);
    }

    private async ValueTask ReadAlignedAsync(long offset, Memory<byte> aligned, CancellationToken cancellationToken)
    {
        var done = 0;
        while (done < aligned.Length)
        {
            var n = await RandomAccess.ReadAsync(_handle, aligned[done..], offset + done, cancellationToken).ConfigureAwait(false);
            if (n == 0)
            {
                aligned.Span[done..].Clear();
                return;
            }
            done += n;
        }
    }

    private async ValueTask DirectWriteAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        var start = AlignDown(offset);
        var end = AlignUp(offset + data.Length);
        var unaligned = start != offset || end != offset + data.Length;
        using var bounce = new AlignedBuffer((int)(end - start), DirectAlignment);
        if (unaligned)
        {
            // Read-modify-write of the partial blocks; serialised so two such writes cannot undo each other.
            await _directRmw.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
        try
        {
            if (unaligned)
            {
                await ReadAlignedAsync(start, bounce.Memory, cancellationToken).ConfigureAwait(false);
            }
            data.Span.CopyTo(bounce.Memory.Span[(int)(offset - start)..]);
            await RandomAccess.WriteAsync(_handle, (ReadOnlyMemory<byte>)bounce.Memory, start, cancellationToken).ConfigureAwait(false);
            if (end > offset + data.Length && offset + data.Length >= Length)
            {
                // The aligned write ran past the real end of the file; put the end back.
                RandomAccess.SetLength(_handle, Math.Max(Length, offset + data.Length));
            }
        }
        finally
        {
            if (unaligned)
            {
                _directRmw.Release();
            }
        }
    }

    private static long AlignDown(long v) => v & ~(long)(DirectAlignment - 1);

    private static long AlignUp(long v) => AlignDown(v + DirectAlignment - 1);
}
