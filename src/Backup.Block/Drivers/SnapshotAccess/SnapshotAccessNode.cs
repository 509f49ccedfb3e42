using Backup.Block.Drivers.CopyBeforeWrite;
using Backup.Block.Posix;

namespace Backup.Block.Drivers.SnapshotAccess;

/// <summary>
/// QEMU's snapshot-access node (block/snapshot-access.c): the point-in-time view of a copy-before-write
/// filter as a node of its own, to export read-only over NBD (image fleecing). Reads and block status go
/// to the filter's snapshot view; a discard tells the filter the reader is done with those clusters, so
/// their space on the fleecing image is freed (the node must be opened with discard=unmap for discards
/// to reach it, as for any node). Writes fail with ENOTSUP; a flush has nothing to do.
/// </summary>
public sealed class SnapshotAccessNode : BlockNode
{
    private readonly BlockNode _file;
    private readonly CopyBeforeWriteNode? _filter;

    internal SnapshotAccessNode(NodeContext context, BlockNode file) : base(context)
    {
        _file = file;
        _filter = file as CopyBeforeWriteNode;
        Children = [new BlockChild("file", file)];
    }

    public override string DriverName => "snapshot-access";

    public override string Filename => _file.Filename;

    /// <summary>The snapshot is the size the filter's file child had (QEMU: total_sectors at open).</summary>
    public override long Length => _file.Length;

    public override IReadOnlyList<BlockChild> Children { get; }

    /// <summary>The snapshot's size cannot follow its source.</summary>
    public override bool SharesResize(BlockChild child) => false;

    private CopyBeforeWriteNode Filter => _filter ?? throw LibC.ErrnoException(LibC.EOPNOTSUPP);

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) =>
        Filter.SnapshotReadAsync(offset, buffer, cancellationToken);

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken) =>
        throw LibC.ErrnoException(LibC.EOPNOTSUPP);

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken) =>
        throw LibC.ErrnoException(LibC.EOPNOTSUPP);

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        Filter.SnapshotDiscardAsync(offset, length, cancellationToken);

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        Filter.SnapshotBlockStatusAsync(offset, length, cancellationToken);

    public override ImageInfo GetImageInfo() => new()
    {
        Filename = Filename,
        Format = DriverName,
        VirtualSize = Length,
        ActualSize = _file.GetImageInfo().ActualSize,
        // QEMU's driver has no get_info: no dirty flag is shown.
        DirtyFlag = null,
    };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}
