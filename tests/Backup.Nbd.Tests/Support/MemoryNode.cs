using Backup.Block;

namespace Backup.Nbd.Tests.Support;

/// <summary>
/// A node over a byte array, for protocol tests: block status reports 4 KiB blocks of zeros as holes,
/// and reads or writes can be made to fail.
/// </summary>
internal sealed class MemoryNode : BlockNode
{
    private const int Block = 4096;
    private readonly byte[] _data;

    public MemoryNode(NodeContext context, int size)
        : base(context)
    {
        _data = new byte[size];
    }

    public byte[] Data => _data;

    public Exception? FailReads { get; set; }
    public Exception? FailWrites { get; set; }

    /// <summary>Delays each write, to keep requests in flight.</summary>
    public TimeSpan WriteDelay { get; set; }

    public int Flushes;

    public override string DriverName => "memory";
    public override long Length => _data.Length;
    public override string Filename => "memory:" + NodeName;

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        if (FailReads is { } e)
        {
            throw e;
        }
        _data.AsSpan((int)offset, buffer.Length).CopyTo(buffer.Span);
        return ValueTask.CompletedTask;
    }

    protected override async ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        if (WriteDelay > TimeSpan.Zero)
        {
            await Task.Delay(WriteDelay, cancellationToken);
        }
        if (FailWrites is { } e)
        {
            throw e;
        }
        data.Span.CopyTo(_data.AsSpan((int)offset));
    }

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        _data.AsSpan((int)offset, (int)length).Clear();
        return ValueTask.CompletedTask;
    }

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref Flushes);
        return ValueTask.CompletedTask;
    }

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        bool IsZero(long o) => _data.AsSpan((int)o, (int)Math.Min(Block - o % Block, _data.Length - o)).IndexOfAnyExcept((byte)0) < 0;
        var zero = IsZero(offset);
        var pos = offset;
        while (pos < offset + length && IsZero(pos) == zero)
        {
            pos += Block - pos % Block;
        }
        var n = Math.Min(pos, offset + length) - offset;
        return ValueTask.FromResult(new BlockStatus(n, zero ? BlockStatusFlags.Zero | BlockStatusFlags.Allocated : BlockStatusFlags.Data | BlockStatusFlags.Allocated));
    }

    public override ImageInfo GetImageInfo() => new() { Filename = Filename, Format = "memory", VirtualSize = Length };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}

/// <summary>driver=memory, size=N: a <see cref="MemoryNode"/>.</summary>
internal sealed class MemoryDriver : IBlockDriver
{
    public string Name => "memory";

    public ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken) =>
        ValueTask.FromResult<BlockNode>(new MemoryNode(context, (int)(context.Options.GetInt64("size") ?? 1 << 20)));
}
