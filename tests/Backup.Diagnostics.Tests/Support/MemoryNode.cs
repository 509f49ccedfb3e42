using Backup.Block;

namespace Backup.Diagnostics.Tests.Support;

/// <summary>
/// A node over a byte array. 4 KiB blocks never written (or discarded, or zeroed with unmap) are
/// unallocated, like clusters of a qcow2 without backing, so map and alloc have something to show.
/// It records the flags of the last write and can fail or pause requests.
/// </summary>
internal class MemoryNode(NodeContext context, int size) : BlockNode(context)
{
    public const int Block = 4096;
    private readonly byte[] _data = new byte[size];
    private readonly bool[] _allocated = new bool[(size + Block - 1) / Block];

    public byte[] Data => _data;

    public WriteFlags LastWriteFlags { get; private set; }

    public string? LastWriteKind { get; private set; }

    public Exception? FailWrites { get; set; }

    public int Flushes;

    public override string DriverName => "memory";
    public override long Length => _data.Length;
    public override string Filename => "memory:" + NodeName;
    public override bool SupportsCompressedWrites => true;

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        _data.AsSpan((int)offset, buffer.Length).CopyTo(buffer.Span);
        return ValueTask.CompletedTask;
    }

    protected override async ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        await BeforeWriteAsync().ConfigureAwait(false);
        if (FailWrites is { } e)
        {
            throw e;
        }
        data.Span.CopyTo(_data.AsSpan((int)offset));
        Mark(offset, data.Length, true);
        (LastWriteKind, LastWriteFlags) = ("write", flags);
    }

    protected override ValueTask WriteCompressedCoreAsync(long offset, ReadOnlyMemory<byte> data, CancellationToken cancellationToken)
    {
        data.Span.CopyTo(_data.AsSpan((int)offset));
        Mark(offset, data.Length, true);
        (LastWriteKind, LastWriteFlags) = ("compressed", WriteFlags.None);
        return ValueTask.CompletedTask;
    }

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        _data.AsSpan((int)offset, (int)length).Clear();
        Mark(offset, length, (flags & WriteFlags.MayUnmap) == 0);
        (LastWriteKind, LastWriteFlags) = ("zeroes", flags);
        return ValueTask.CompletedTask;
    }

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        _data.AsSpan((int)offset, (int)length).Clear();
        Mark(offset, length, false);
        return ValueTask.CompletedTask;
    }

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref Flushes);
        return ValueTask.CompletedTask;
    }

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        var first = _allocated[offset / Block];
        var end = offset;
        while (end < offset + length && _allocated[end / Block] == first)
        {
            end += Block - end % Block;
        }
        var flags = first ? BlockStatusFlags.Data | BlockStatusFlags.Allocated : BlockStatusFlags.Zero;
        return ValueTask.FromResult(new BlockStatus(Math.Min(end, offset + length) - offset, flags));
    }

    protected virtual ValueTask BeforeWriteAsync() => ValueTask.CompletedTask;

    public override ImageInfo GetImageInfo() => new() { Filename = Filename, Format = "memory", VirtualSize = Length };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;

    /// <summary>Whole blocks inside a discarded/unmapped range lose their allocation; any written byte allocates its block.</summary>
    private void Mark(long offset, long length, bool allocated)
    {
        if (allocated)
        {
            for (var b = offset / Block; b * Block < offset + length; b++)
            {
                _allocated[b] = true;
            }
            return;
        }
        for (var b = (offset + Block - 1) / Block; (b + 1) * Block <= offset + length; b++)
        {
            _allocated[b] = false;
        }
    }

}

/// <summary>driver=memory (size=N, breakpoints=true for a <see cref="BreakpointMemoryNode"/>).</summary>
internal sealed class MemoryDriver : IBlockDriver
{
    public string Name => "memory";

    public ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        var size = (int)(context.Options.GetInt64("size") ?? 1 << 20);
        return ValueTask.FromResult<BlockNode>(context.Options.GetBool("breakpoints") == true
            ? new BreakpointMemoryNode(context, size)
            : new MemoryNode(context, size));
    }

    /// <summary>A graph with one memory node named <paramref name="name"/>.</summary>
    public static async Task<(BlockGraph Graph, T Node)> GraphWithAsync<T>(string name, int size = 1 << 20, bool readOnly = false)
        where T : MemoryNode
    {
        var graph = new BlockGraph([new MemoryDriver()]);
        // discard=unmap, so that discard and write -z -u reach the node (QEMU ignores them otherwise).
        var options = new BlockOptions { ["driver"] = "memory", ["node-name"] = name, ["size"] = (long)size, ["discard"] = "unmap" };
        if (typeof(T) == typeof(BreakpointMemoryNode))
        {
            options["breakpoints"] = true;
        }
        if (readOnly)
        {
            options["read-only"] = true;
        }
        return (graph, (T)await graph.AddAsync(options));
    }
}

/// <summary>
/// A memory node with blkdebug-style breakpoints on write_aio: a write raising the event while a
/// breakpoint is set stays paused under its tag until resumed (what the blkdebug driver provides).
/// </summary>
internal sealed class BreakpointMemoryNode(NodeContext context, int size) : MemoryNode(context, size), IDebugBreakpoints
{
    private readonly Lock _lock = new();
    private readonly Dictionary<string, BlkdebugEvent> _breakpoints = [];
    private readonly Dictionary<string, TaskCompletionSource> _suspended = [];

    public void SetBreakpoint(BlkdebugEvent ev, string tag)
    {
        lock (_lock)
        {
            _breakpoints[tag] = ev;
        }
    }

    public bool RemoveBreakpoint(string tag)
    {
        lock (_lock)
        {
            var removed = _breakpoints.Remove(tag);
            if (_suspended.Remove(tag, out var held))
            {
                held.SetResult();
                removed = true;
            }
            return removed;
        }
    }

    public bool Resume(string tag)
    {
        lock (_lock)
        {
            if (!_suspended.Remove(tag, out var held))
            {
                return false;
            }
            held.SetResult();
            return true;
        }
    }

    public bool IsSuspended(string tag)
    {
        lock (_lock)
        {
            return _suspended.ContainsKey(tag);
        }
    }

    protected override async ValueTask BeforeWriteAsync()
    {
        Task? wait = null;
        lock (_lock)
        {
            var hit = _breakpoints.FirstOrDefault(b => b.Value == BlkdebugEvent.WriteAio);
            if (hit.Key is { } tag)
            {
                // Like blkdebug, a breakpoint fires once: it is consumed by the request it stops.
                _breakpoints.Remove(tag);
                var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                _suspended[tag] = tcs;
                wait = tcs.Task;
            }
        }
        if (wait is not null)
        {
            await wait.ConfigureAwait(false);
        }
    }
}

/// <summary>stdout and stderr of the daemon, captured.</summary>
internal sealed class CapturedConsole : QemuIo.IQemuIoConsole
{
    private readonly Lock _lock = new();
    private readonly System.Text.StringBuilder _out = new();
    private readonly System.Text.StringBuilder _err = new();

    public string Stdout
    {
        get
        {
            lock (_lock)
            {
                return _out.ToString();
            }
        }
    }

    public string Stderr
    {
        get
        {
            lock (_lock)
            {
                return _err.ToString();
            }
        }
    }

    public void Out(string text)
    {
        lock (_lock)
        {
            _out.Append(text);
        }
    }

    public void Error(string text)
    {
        lock (_lock)
        {
            _err.Append(text);
        }
    }

    public void Clear()
    {
        lock (_lock)
        {
            _out.Clear();
            _err.Clear();
        }
    }
}
