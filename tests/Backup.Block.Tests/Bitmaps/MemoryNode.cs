namespace Backup.Block.Tests.Bitmaps;

/// <summary>A node that keeps nothing: enough to drive the I/O path and its observers.</summary>
internal sealed class MemoryNode : BlockNode
{
    private readonly int? _clusterSize;

    public MemoryNode(long length, string name = "drive0", DiscardMode discard = DiscardMode.Ignore,
        int? clusterSize = null, string format = "raw")
        : base(new NodeContext
        {
            NodeName = name,
            Graph = BlockGraph.CreateDefault(),
            Options = [],
            Discard = discard,
        })
    {
        Length = length;
        _clusterSize = clusterSize;
        DriverName = format;
    }

    public override string DriverName { get; }

    public override long Length { get; }

    public override string Filename => "memory";

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        buffer.Span.Clear();
        return ValueTask.CompletedTask;
    }

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken) =>
        ValueTask.CompletedTask;

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken) =>
        ValueTask.CompletedTask;

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        ValueTask.CompletedTask;

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        ValueTask.FromResult(new BlockStatus(length, BlockStatusFlags.Data | BlockStatusFlags.Allocated));

    public override ImageInfo GetImageInfo() => new()
    {
        Filename = Filename,
        Format = DriverName,
        VirtualSize = Length,
        ClusterSize = _clusterSize,
    };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}
