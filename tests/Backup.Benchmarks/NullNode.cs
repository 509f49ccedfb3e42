using Backup.Block;

namespace Backup.Benchmarks;

/// <summary>A node that stores nothing; benchmarks only need its length and observers.</summary>
internal sealed class NullNode(long length) : BlockNode(new NodeContext
{
    NodeName = "bench0",
    Graph = BlockGraph.CreateDefault(),
    Options = [],
})
{
    public override string DriverName => "null";

    public override long Length => length;

    public override string Filename => "null";

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        ValueTask.FromResult(new BlockStatus(length, BlockStatusFlags.Data));

    public override ImageInfo GetImageInfo() => new() { Filename = Filename, Format = DriverName, VirtualSize = length };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}
