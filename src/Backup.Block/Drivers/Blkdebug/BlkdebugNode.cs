using System.Buffers;
using Backup.Block.Posix;

namespace Backup.Block.Drivers.Blkdebug;

/// <summary>
/// A blkdebug filter node over its image. Requests reach <see cref="BlkdebugRules.Check"/> in the pieces
/// QEMU's generic layer would hand the driver: reads and writes cut at <c>max-transfer</c>, unaligned
/// requests widened to <c>align</c> (writes by read-modify-write, whose reads are checked as reads, as in
/// QEMU), write-zeroes and discards cut at <c>opt-*</c> boundaries and <c>max-*</c> sizes. So the image
/// never sees a request larger than the limits, and a sector rule matches the piece that covers it.
/// </summary>
internal sealed class BlkdebugNode : BlockNode, IDebugBreakpoints
{
    private readonly BlockNode _image;
    private readonly BlkdebugOptions _options;
    private readonly BlkdebugRules _rules;

    // Read-modify-write of partial blocks must not interleave with other writes to the same block
    // (QEMU serialises such requests); only nodes with an alignment above 1 ever do it.
    private readonly SemaphoreSlim? _serialise;

    // QEMU skips a flush (and its rule check) when nothing was written since the last one (write_gen).
    private int _writtenSinceFlush;

    public BlkdebugNode(NodeContext context, BlockNode image, BlkdebugOptions options) : base(context)
    {
        _image = image;
        _options = options;
        _rules = new BlkdebugRules(options.Rules);
        _serialise = options.Align > 1 ? new SemaphoreSlim(1, 1) : null;
        Children = [new BlockChild("image", image)];
    }

    public override string DriverName => "blkdebug";

    /// <summary>QEMU's name for a node shaped only by config and image; otherwise the image's (QEMU shows json:{...}).</summary>
    public override string Filename => _options.HasOnlyConfig ? $"blkdebug:{_options.ConfigFile}:{_image.Filename}" : _image.Filename;

    public override long Length => _image.Length;

    /// <summary>QEMU's blkdebug is a filter: queries count its image as the next layer (backing_file_depth 1).</summary>
    public override bool IsFilter => true;

    /// <summary>
    /// A filter passes resizes to its image, and a format over it may write past the end to grow its file
    /// (QEMU's filters forward truncate to their file child); the image itself decides what it allows.
    /// </summary>
    protected override bool IsGrowable => true;

    protected override ValueTask TruncateCoreAsync(long length, CancellationToken cancellationToken) =>
        _image.TruncateAsync(length, cancellationToken);

    public override IReadOnlyList<BlockChild> Children { get; }

    internal BlkdebugOptions Options => _options;

    /// <summary>The state of the rule state machine (1 at open).</summary>
    internal int State => _rules.State;

    protected override ValueTask OnDebugEventAsync(BlkdebugEvent ev) => _rules.OnEventAsync(ev);

    // ------------------------------------------------------------------ breakpoints

    public void SetBreakpoint(BlkdebugEvent ev, string tag) => _rules.SetBreakpoint(ev, tag);

    public bool RemoveBreakpoint(string tag) => _rules.RemoveBreakpoint(tag);

    public bool Resume(string tag) => _rules.Resume(tag);

    public bool IsSuspended(string tag) => _rules.IsSuspended(tag);

    // ------------------------------------------------------------------ rule checks

    private ValueTask CheckAsync(long offset, long bytes, BlkdebugIoTypes type)
    {
        var errno = _rules.Check(offset, bytes, type, out var immediately);
        if (errno <= 0)
        {
            // QEMU returns -errno: a negative errno in a rule comes back as a positive, i.e. successful, result.
            return ValueTask.CompletedTask;
        }
        return immediately ? ValueTask.FromException(LibC.ErrnoException(errno)) : FailAfterYieldAsync(errno);
    }

    /// <summary>Without <c>immediately</c> QEMU lets the request yield once before it fails.</summary>
    private static async ValueTask FailAfterYieldAsync(int errno)
    {
        await Task.Yield();
        throw LibC.ErrnoException(errno);
    }

    private long AlignDown(long v) => v - (v % _options.Align);

    private long AlignUp(long v) => AlignDown(v + _options.Align - 1);

    private bool IsAligned(long v) => v % _options.Align == 0;

    /// <summary>The largest piece the image gets at once: max-transfer, else unbounded.</summary>
    private long MaxPiece => _options.MaxTransfer > 0 ? _options.MaxTransfer : long.MaxValue;

    // ------------------------------------------------------------------ read

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) =>
        IsAligned(offset) && IsAligned(buffer.Length)
            ? ReadAlignedAsync(offset, buffer, cancellationToken)
            : ReadPaddedAsync(offset, buffer, cancellationToken);

    private async ValueTask ReadAlignedAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        for (var pos = 0; pos < buffer.Length;)
        {
            var n = (int)Math.Min(buffer.Length - pos, MaxPiece);
            await CheckAsync(offset + pos, n, BlkdebugIoTypes.Read).ConfigureAwait(false);
            // The aligned piece may reach past the end of an image that is not a multiple of align: zeros there.
            var available = (int)Math.Clamp(_image.Length - (offset + pos), 0, n);
            if (available > 0)
            {
                await _image.ReadAsync(offset + pos, buffer.Slice(pos, available), cancellationToken).ConfigureAwait(false);
            }
            buffer.Span.Slice(pos + available, n - available).Clear();
            pos += n;
        }
    }

    private async ValueTask ReadPaddedAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        var start = AlignDown(offset);
        var length = checked((int)(AlignUp(offset + buffer.Length) - start));
        var bounce = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            await ReadAlignedAsync(start, bounce.AsMemory(0, length), cancellationToken).ConfigureAwait(false);
            bounce.AsSpan((int)(offset - start), buffer.Length).CopyTo(buffer.Span);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(bounce);
        }
    }

    // ------------------------------------------------------------------ write

    protected override async ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        Volatile.Write(ref _writtenSinceFlush, 1);
        if (_serialise is null)
        {
            await WriteAlignedAsync(offset, data, flags, cancellationToken).ConfigureAwait(false);
            return;
        }
        await _serialise.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (IsAligned(offset) && IsAligned(data.Length))
            {
                await WriteAlignedAsync(offset, data, flags, cancellationToken).ConfigureAwait(false);
            }
            else
            {
                await ReadModifyWriteAsync(offset, data, flags, cancellationToken).ConfigureAwait(false);
            }
        }
        finally
        {
            _serialise.Release();
        }
    }

    private async ValueTask WriteAlignedAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        for (var pos = 0; pos < data.Length;)
        {
            var n = (int)Math.Min(data.Length - pos, MaxPiece);
            await CheckAsync(offset + pos, n, BlkdebugIoTypes.Write).ConfigureAwait(false);
            await _image.WriteAsync(offset + pos, data.Slice(pos, n), flags, cancellationToken).ConfigureAwait(false);
            pos += n;
        }
    }

    /// <summary>
    /// An unaligned write (or zeroing) of <paramref name="data"/>: the partial head and tail blocks are read
    /// (events pwritev_rmw_head/after_head/tail/after_tail, as QEMU's padding), patched, and written aligned.
    /// The caller holds <see cref="_serialise"/>.
    /// </summary>
    private async ValueTask ReadModifyWriteAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        var start = AlignDown(offset);
        var end = AlignUp(offset + data.Length);
        var length = checked((int)(end - start));
        var align = (int)_options.Align;
        var buffer = ArrayPool<byte>.Shared.Rent(length);
        try
        {
            var whole = buffer.AsMemory(0, length);
            var headPartial = offset != start;
            var tailPartial = offset + data.Length != end;
            if (headPartial)
            {
                await DebugEventAsync(BlkdebugEvent.PwritevRmwHead).ConfigureAwait(false);
                await ReadAlignedAsync(start, whole[..align], cancellationToken).ConfigureAwait(false);
                await DebugEventAsync(BlkdebugEvent.PwritevRmwAfterHead).ConfigureAwait(false);
            }
            if (tailPartial && !(headPartial && length == align))
            {
                await DebugEventAsync(BlkdebugEvent.PwritevRmwTail).ConfigureAwait(false);
                await ReadAlignedAsync(end - align, whole[(length - align)..], cancellationToken).ConfigureAwait(false);
                await DebugEventAsync(BlkdebugEvent.PwritevRmwAfterTail).ConfigureAwait(false);
            }
            data.Span.CopyTo(whole.Span[(int)(offset - start)..]);
            await WriteAlignedAsync(start, whole, flags, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    // ------------------------------------------------------------------ write-zeroes

    protected override async ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        Volatile.Write(ref _writtenSinceFlush, 1);
        if (_serialise is not null)
        {
            await _serialise.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
        try
        {
            // Partial blocks of the request alignment become read-modify-writes of zeros (QEMU's padding).
            var alignedStart = AlignUp(offset);
            var alignedEnd = Math.Max(AlignDown(offset + length), alignedStart);
            if (alignedStart > offset || alignedEnd < offset + length)
            {
                if (alignedStart >= offset + length || alignedStart == alignedEnd)
                {
                    await ZeroByWriteAsync(offset, length, flags, rmw: true, cancellationToken).ConfigureAwait(false);
                    return;
                }
                if (alignedStart > offset)
                {
                    await ZeroByWriteAsync(offset, alignedStart - offset, flags, rmw: true, cancellationToken).ConfigureAwait(false);
                }
                if (alignedEnd < offset + length)
                {
                    await ZeroByWriteAsync(alignedEnd, offset + length - alignedEnd, flags, rmw: true, cancellationToken).ConfigureAwait(false);
                }
            }
            await ZeroAlignedAsync(alignedStart, alignedEnd - alignedStart, flags, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            _serialise?.Release();
        }
    }

    /// <summary>
    /// QEMU's bdrv_co_do_pwrite_zeroes: pieces up to the next opt-write-zero boundary, then aligned pieces
    /// of at most max-write-zero. blkdebug refuses pieces smaller than the alignment (ENOTSUP), and the
    /// generic layer writes zeros there instead: those pieces are checked as writes.
    /// </summary>
    private async ValueTask ZeroAlignedAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        var alignment = Math.Max(_options.OptWriteZero, _options.Align);
        var maxPiece = _options.MaxWriteZero > 0 ? _options.MaxWriteZero : int.MaxValue;
        maxPiece = Math.Max(maxPiece - maxPiece % alignment, alignment);
        var head = offset % alignment;
        var tail = (offset + length) % alignment;
        while (length > 0)
        {
            var n = length;
            if (head != 0)
            {
                n = Math.Min(length, alignment - head);
                head = (head + n) % alignment;
            }
            else if (tail != 0 && n > alignment)
            {
                n -= tail;
            }
            n = Math.Min(n, maxPiece);
            if (n < alignment)
            {
                await ZeroByWriteAsync(offset, n, flags, rmw: false, cancellationToken).ConfigureAwait(false);
            }
            else
            {
                await CheckAsync(offset, n, BlkdebugIoTypes.WriteZeroes).ConfigureAwait(false);
                await _image.WriteZeroesAsync(offset, n, flags, cancellationToken).ConfigureAwait(false);
            }
            offset += n;
            length -= n;
        }
    }

    /// <summary>Zeros written as data, in max-transfer pieces (or by read-modify-write for partial blocks).</summary>
    private async ValueTask ZeroByWriteAsync(long offset, long length, WriteFlags flags, bool rmw, CancellationToken cancellationToken)
    {
        var chunk = (int)Math.Min(length, Math.Min(MaxPiece, 1 << 20));
        var zeros = ArrayPool<byte>.Shared.Rent(chunk);
        try
        {
            Array.Clear(zeros, 0, chunk);
            for (long pos = 0; pos < length;)
            {
                var n = (int)Math.Min(length - pos, chunk);
                var piece = zeros.AsMemory(0, n);
                if (rmw)
                {
                    await ReadModifyWriteAsync(offset + pos, piece, flags & ~WriteFlags.MayUnmap, cancellationToken).ConfigureAwait(false);
                }
                else
                {
                    await WriteAlignedAsync(offset + pos, piece, flags & ~WriteFlags.MayUnmap, cancellationToken).ConfigureAwait(false);
                }
                pos += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(zeros);
        }
    }

    // ------------------------------------------------------------------ discard

    /// <summary>
    /// QEMU's bdrv_co_pdiscard: pieces cut at opt-discard boundaries and max-discard; pieces smaller than the
    /// request alignment are dropped (blkdebug answers ENOTSUP, which discard ignores).
    /// </summary>
    protected override async ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        Volatile.Write(ref _writtenSinceFlush, 1);
        var align = Math.Max(_options.OptDiscard, _options.Align);
        var maxPiece = _options.MaxDiscard > 0 ? _options.MaxDiscard : int.MaxValue;
        maxPiece = Math.Max(maxPiece - maxPiece % align, align);
        var head = offset % align;
        var tail = (offset + length) % align;
        while (length > 0)
        {
            var n = length;
            if (head != 0)
            {
                n = Math.Min(length, align - head);
                if (n % _options.Align != 0)
                {
                    n %= _options.Align;
                }
                head = (head + n) % align;
            }
            else if (tail != 0)
            {
                if (n > align)
                {
                    n -= tail;
                }
                else if (tail % _options.Align != 0 && tail > _options.Align)
                {
                    tail %= _options.Align;
                    n -= tail;
                }
            }
            n = Math.Min(n, maxPiece);
            if (n >= _options.Align)
            {
                await CheckAsync(offset, n, BlkdebugIoTypes.Discard).ConfigureAwait(false);
                await _image.DiscardAsync(offset, n, cancellationToken).ConfigureAwait(false);
            }
            offset += n;
            length -= n;
        }
    }

    // ------------------------------------------------------------------ flush, block status

    protected override async ValueTask FlushCoreAsync(CancellationToken cancellationToken)
    {
        if (Interlocked.Exchange(ref _writtenSinceFlush, 0) == 0)
        {
            await _image.FlushAsync(cancellationToken).ConfigureAwait(false);
            return;
        }
        try
        {
            await CheckAsync(0, 0, BlkdebugIoTypes.Flush).ConfigureAwait(false);
            await _image.FlushAsync(cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            Volatile.Write(ref _writtenSinceFlush, 1);
            throw;
        }
    }

    protected override async ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        await CheckAsync(offset, length, BlkdebugIoTypes.BlockStatus).ConfigureAwait(false);
        return await _image.GetBlockStatusAsync(offset, length, cancellationToken).ConfigureAwait(false);
    }

    public override ImageInfo GetImageInfo() => new()
    {
        Filename = Filename,
        Format = DriverName,
        VirtualSize = Length,
        BackingImage = _image.GetImageInfo(),
    };

    public override ValueTask CloseAsync()
    {
        // Nothing may stay suspended at a breakpoint once the node goes.
        _rules.ResumeAll();
        _serialise?.Dispose();
        return ValueTask.CompletedTask;
    }
}
