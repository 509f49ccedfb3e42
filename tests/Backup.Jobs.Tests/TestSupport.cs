using Backup.Block;

namespace Backup.Jobs.Tests;

/// <summary>A node that keeps its bytes in memory; writes can be made to fail.</summary>
internal sealed class ByteNode : BlockNode
{
    private readonly byte[] _data;

    public ByteNode(long length, string name, int? clusterSize = null)
        : base(new NodeContext { NodeName = name, Graph = BlockGraph.CreateDefault(), Options = [] })
    {
        _data = new byte[length];
        ClusterSizeValue = clusterSize;
    }

    public int? ClusterSizeValue { get; }

    /// <summary>When set, every write fails with this errno.</summary>
    public int FailWrites { get; set; }

    /// <summary>When set, writes that cover this offset fail with EIO.</summary>
    public long? FailWritesAt { get; set; }

    /// <summary>When set, writes wait for it to complete before they do anything.</summary>
    public Task? WriteGate { get; set; }

    /// <summary>Each write waits this long first, as a disk would: the writer yields instead of completing inline.</summary>
    public TimeSpan WriteDelay { get; set; }

    /// <summary>Writes that reached the node (including those still waiting for <see cref="WriteGate"/>).</summary>
    public int WritesStarted => Volatile.Read(ref _writesStarted);

    private int _writesStarted;

    public byte[] Snapshot() => (byte[])_data.Clone();

    public override string DriverName => "raw";

    public override long Length => _data.Length;

    public override string Filename => "memory:" + NodeName;

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        lock (_data)
        {
            _data.AsSpan((int)offset, buffer.Length).CopyTo(buffer.Span);
        }
        return ValueTask.CompletedTask;
    }

    protected override async ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        await BeforeWriteAsync(offset, data.Length);
        lock (_data)
        {
            data.Span.CopyTo(_data.AsSpan((int)offset));
        }
    }

    protected override async ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        await BeforeWriteAsync(offset, length);
        lock (_data)
        {
            _data.AsSpan((int)offset, (int)length).Clear();
        }
    }

    private async ValueTask BeforeWriteAsync(long offset, long length)
    {
        Interlocked.Increment(ref _writesStarted);
        if (WriteDelay > TimeSpan.Zero)
        {
            await Task.Delay(WriteDelay);
        }
        if (WriteGate is { } gate)
        {
            await gate;
        }
        if (FailWrites != 0)
        {
            throw new IOException("injected", FailWrites);
        }
        if (FailWritesAt is { } at && offset <= at && at < offset + length)
        {
            throw new IOException("injected", 5);
        }
    }

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => ValueTask.CompletedTask;

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        ValueTask.FromResult(new BlockStatus(length, BlockStatusFlags.Data | BlockStatusFlags.Allocated));

    public override ImageInfo GetImageInfo() => new() { Filename = Filename, Format = DriverName, VirtualSize = Length, ClusterSize = ClusterSizeValue };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}

/// <summary>Records events as "NAME" or "status" strings (JOB_STATUS_CHANGE shows its status).</summary>
internal sealed class EventLog : IEventSink
{
    private readonly List<(string Name, IReadOnlyList<KeyValuePair<string, object?>> Data)> _events = [];

    public void Emit(string name, IReadOnlyList<KeyValuePair<string, object?>> data)
    {
        lock (_events)
        {
            _events.Add((name, data));
        }
    }

    public List<(string Name, IReadOnlyList<KeyValuePair<string, object?>> Data)> All
    {
        get
        {
            lock (_events)
            {
                return [.. _events];
            }
        }
    }

    public string Sequence(string id) => string.Join(' ', All
        .Where(e => e.Data.Any(p => p.Key is "id" or "device" && (string?)p.Value == id))
        .Select(e => e.Name == "JOB_STATUS_CHANGE" ? (string)e.Data.First(p => p.Key == "status").Value! : e.Name));

    public object? Value(string name, string key) =>
        All.Last(e => e.Name == name).Data.FirstOrDefault(p => p.Key == key).Value;

    public async Task WaitForAsync(Func<EventLog, bool> condition, int timeoutMs = 10000)
    {
        var deadline = Environment.TickCount64 + timeoutMs;
        while (!condition(this))
        {
            if (Environment.TickCount64 > deadline)
            {
                throw new TimeoutException("events: " + string.Join(", ", All.Select(e => e.Name)));
            }
            await Task.Delay(5);
        }
    }
}
