namespace Backup.Block.Drivers.Null;

/// <summary>
/// A null node: <see cref="Length"/> bytes that store nothing.
/// </summary>
/// <remarks>
/// <para><b>Reads.</b> QEMU leaves the caller's buffer untouched unless <c>read-zeroes</c> is on (QSD
/// 7.2 then serves an NBD client whatever its buffer held, e.g. the data of an earlier write). Here a
/// read always fills the buffer with zeros: buffers come from shared pools, and leaving them as they
/// are would hand one client's data to another. The block status still says what QEMU's does: with
/// <c>read-zeroes</c> the node is allocated and reads as zeros; without it, nothing is known (neither
/// data nor zero, not allocated), so a backup into it never skips a write on the belief that the
/// target already holds zeros.</para>
/// <para><b>latency-ns</b> delays every read, write, write-zeroes, discard and flush by that long,
/// asynchronously, as QEMU's does.</para>
/// </remarks>
public sealed class NullNode : BlockNode
{
    private readonly long _length;
    private readonly TimeSpan _latency;
    private readonly bool _readZeroes;
    private readonly string _driverName;

    internal NullNode(NodeContext context, string driverName, long size, long latencyNs, bool readZeroes, string filename)
        : base(context)
    {
        _driverName = driverName;
        // QEMU counts the length in whole 512-byte sectors: a size of 1000 reads as 1024 bytes.
        _length = (size + 511) & ~511L;
        _latency = TimeSpan.FromTicks(latencyNs / 100);
        _readZeroes = readZeroes;
        Filename = filename;
    }

    public override string DriverName => _driverName;

    public override string Filename { get; }

    public override long Length => _length;

    public bool ReadZeroes => _readZeroes;

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        buffer.Span.Clear();
        return DelayAsync(cancellationToken);
    }

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken) =>
        DelayAsync(cancellationToken);

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken) =>
        DelayAsync(cancellationToken);

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        DelayAsync(cancellationToken);

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => DelayAsync(cancellationToken);

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        ValueTask.FromResult(new BlockStatus(length,
            _readZeroes ? BlockStatusFlags.Zero | BlockStatusFlags.Allocated : BlockStatusFlags.None,
            _readZeroes ? 1 : 0));

    private ValueTask DelayAsync(CancellationToken cancellationToken) =>
        _latency == TimeSpan.Zero ? ValueTask.CompletedTask : new ValueTask(Task.Delay(_latency, cancellationToken));

    /// <summary>QSD reports no dirty flag and no cluster size for null nodes (no bdrv_get_info).</summary>
    public override ImageInfo GetImageInfo() => new()
    {
        Filename = Filename,
        Format = _driverName,
        VirtualSize = _length,
        ActualSize = 0,
        DirtyFlag = null,
    };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}
