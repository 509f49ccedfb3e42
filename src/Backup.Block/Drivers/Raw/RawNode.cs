namespace Backup.Block.Drivers.Raw;

/// <summary>A raw image: requests go to the file child shifted by <c>offset</c>.</summary>
public sealed class RawNode : BlockNode
{
    private readonly BlockNode _file;
    private readonly long _offset;
    private readonly long? _size;

    internal RawNode(NodeContext context, BlockNode file, long offset, long? size) : base(context)
    {
        _file = file;
        _offset = offset;
        _size = size;
        Children = [new BlockChild("file", file)];
    }

    public override string DriverName => "raw";

    public override string Filename => _file.Filename;

    /// <summary>Without an explicit size, a raw node follows its file (which may be resized underneath).</summary>
    public override long Length => _size ?? Math.Max(0, _file.Length - _offset);

    public override IReadOnlyList<BlockChild> Children { get; }

    /// <summary>
    /// QEMU's raw: a window with an explicit size cannot change; otherwise the file is resized to hold
    /// the new size after the offset, and the node follows it.
    /// </summary>
    protected override ValueTask TruncateCoreAsync(long length, CancellationToken cancellationToken)
    {
        if (_size is not null)
        {
            throw new BlockException("Cannot resize fixed-size raw disks");
        }
        if (long.MaxValue - length < _offset)
        {
            throw new BlockException("Disk size too large for the chosen offset");
        }
        return _file.TruncateAsync(_offset + length, cancellationToken);
    }

    /// <summary>Only a raw node that is its whole file (QEMU's filtered child) lets the file be resized under it.</summary>
    public override bool SharesResize(BlockChild child) => _offset == 0 && _size is null;

    // QEMU's raw format raises read_aio / write_aio on its file before passing a request on. Only a
    // blkdebug file reacts; for any other the event is a completed ValueTask and the call goes straight on.
    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        var ev = _file.DebugEventAsync(BlkdebugEvent.ReadAio);
        return ev.IsCompletedSuccessfully
            ? _file.ReadAsync(_offset + offset, buffer, cancellationToken)
            : ReadAfterEventAsync(ev, offset, buffer, cancellationToken);
    }

    private async ValueTask ReadAfterEventAsync(ValueTask ev, long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        await ev.ConfigureAwait(false);
        await _file.ReadAsync(_offset + offset, buffer, cancellationToken).ConfigureAwait(false);
    }

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        var ev = _file.DebugEventAsync(BlkdebugEvent.WriteAio);
        return ev.IsCompletedSuccessfully
            ? _file.WriteAsync(_offset + offset, data, flags, cancellationToken)
            : WriteAfterEventAsync(ev, offset, data, flags, cancellationToken);
    }

    private async ValueTask WriteAfterEventAsync(ValueTask ev, long offset, ReadOnlyMemory<byte> data, WriteFlags flags,
        CancellationToken cancellationToken)
    {
        await ev.ConfigureAwait(false);
        await _file.WriteAsync(_offset + offset, data, flags, cancellationToken).ConfigureAwait(false);
    }

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken) =>
        _file.WriteZeroesAsync(_offset + offset, length, flags, cancellationToken);

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        _file.DiscardAsync(_offset + offset, length, cancellationToken);

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => _file.FlushAsync(cancellationToken);

    protected override async ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        var s = await _file.GetBlockStatusAsync(_offset + offset, length, cancellationToken).ConfigureAwait(false);
        return s with { Length = Math.Max(Math.Min(s.Length, length), 0) };
    }

    public override ImageInfo GetImageInfo() => new()
    {
        Filename = Filename,
        Format = "raw",
        VirtualSize = Length,
        ActualSize = _file.GetImageInfo().ActualSize,
    };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}
