namespace Backup.Block.Drivers.CopyBeforeWrite;

/// <summary>
/// The copy-before-write filter a backup job puts above its source while it runs (QEMU's
/// block/copy-before-write.c): a node named by the job's filter-node-name (or a generated name) whose
/// file child is the source. Every request is forwarded to the source through the source's own I/O
/// path, so the job's copy-before-write observer on the source sees writes made through this node as
/// well as writes made to the source directly (exports attach to nodes by reference here, and QEMU's
/// re-parenting of them is not needed for the point in time to hold).
/// </summary>
public sealed class CopyBeforeWriteNode : BlockNode
{
    private readonly BlockNode _source;

    public CopyBeforeWriteNode(NodeContext context, BlockNode source) : base(context)
    {
        ArgumentNullException.ThrowIfNull(source);
        _source = source;
        Children = [new BlockChild("file", source)];
    }

    public override string DriverName => "copy-before-write";

    public override bool IsFilter => true;

    /// <summary>QEMU's filter takes its source's size as fixed while the backup runs.</summary>
    public override bool SharesResize(BlockChild child) => false;

    public override string Filename => _source.Filename;

    public override long Length => _source.Length;

    public override IReadOnlyList<BlockChild> Children { get; }

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) =>
        _source.ReadAsync(offset, buffer, cancellationToken);

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken) =>
        _source.WriteAsync(offset, data, flags, cancellationToken);

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken) =>
        _source.WriteZeroesAsync(offset, length, flags, cancellationToken);

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        _source.DiscardAsync(offset, length, cancellationToken);

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => _source.FlushAsync(cancellationToken);

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        _source.GetBlockStatusAsync(offset, length, cancellationToken);

    /// <summary>As QEMU shows a filter: its own format name over the child's sizes, the child as backing image.</summary>
    public override ImageInfo GetImageInfo()
    {
        var below = _source.GetImageInfo();
        return new ImageInfo
        {
            Filename = below.Filename,
            Format = DriverName,
            VirtualSize = Length,
            ActualSize = below.ActualSize,
            ClusterSize = below.ClusterSize,
            BackingImage = below,
        };
    }

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}
