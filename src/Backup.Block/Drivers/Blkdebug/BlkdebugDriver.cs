namespace Backup.Block.Drivers.Blkdebug;

/// <summary>One inject-error rule (QAPI BlkdebugInjectErrorOptions).</summary>
internal sealed record BlkdebugRule(string Event, long State, int IoTypeMask, int Errno, long Sector, bool Once);

/// <summary>
/// The <c>blkdebug</c> filter: passes every request to its <c>image</c> child, and fails those that an
/// active <c>inject-error</c> rule matches with the rule's errno (once, or every time), for tests.
/// QEMU's option names; events are the ones the filter itself sees: <c>none</c> (at open),
/// <c>read_aio</c> (reads), <c>pwritev</c> and <c>write_aio</c> (writes), <c>pwritev_zero</c>
/// (write-zeroes) and <c>flush_to_disk</c> (flushes). A rule becomes active when its event fires
/// (in any state, or the state it names; the node starts in state 1) and then applies to every
/// request of its I/O types that covers its sector (any sector when none is given).
/// </summary>
public sealed class BlkdebugDriver : IBlockDriver
{
    public string Name => "blkdebug";

    internal const int IoRead = 1, IoWrite = 2, IoWriteZeroes = 4, IoDiscard = 8, IoFlush = 16, IoBlockStatus = 32;

    public async ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var rules = new List<BlkdebugRule>();
        if (context.Options["inject-error"] is IEnumerable<object?> list)
        {
            foreach (var item in list)
            {
                if (item is not BlockOptions o)
                {
                    continue;
                }
                var mask = o.GetString("iotype") switch
                {
                    null => IoRead | IoWrite | IoWriteZeroes | IoDiscard | IoFlush,
                    "read" => IoRead,
                    "write" => IoWrite,
                    "write-zeroes" => IoWriteZeroes,
                    "discard" => IoDiscard,
                    "flush" => IoFlush,
                    "block-status" => IoBlockStatus,
                    var other => throw new BlockException($"Invalid iotype '{other}'"),
                };
                rules.Add(new BlkdebugRule(o.GetString("event") ?? "none", o.GetInt64("state") ?? 0, mask,
                    (int)(o.GetInt64("errno") ?? 5), o.GetInt64("sector") ?? -1, o.GetBool("once") ?? false));
            }
        }
        var image = (await context.Graph.OpenChildAsync(context, "image", required: true, cancellationToken).ConfigureAwait(false))!;
        var node = new BlkdebugNode(context, image, rules);
        node.Fire("none");
        return node;
    }
}

/// <summary>A blkdebug filter node over its image.</summary>
internal sealed class BlkdebugNode : BlockNode
{
    private readonly BlockNode _image;
    private readonly List<BlkdebugRule> _rules;
    private readonly List<BlkdebugRule> _active = [];
    private const long State = 1;

    public BlkdebugNode(NodeContext context, BlockNode image, List<BlkdebugRule> rules) : base(context)
    {
        _image = image;
        _rules = rules;
        Children = [new BlockChild("image", image)];
    }

    public override string DriverName => "blkdebug";

    public override string Filename => _image.Filename;

    public override long Length => _image.Length;

    public override IReadOnlyList<BlockChild> Children { get; }

    /// <summary>Like QEMU's blkdebug: a resize goes to the image, which may be resized under the filter.</summary>
    protected override ValueTask TruncateCoreAsync(long length, CancellationToken cancellationToken) =>
        _image.TruncateAsync(length, cancellationToken);

    public override bool SharesResize(BlockChild child) => true;

    internal void Fire(string ev)
    {
        lock (_active)
        {
            foreach (var r in _rules)
            {
                if (r.Event == ev && (r.State == 0 || r.State == State) && !_active.Contains(r))
                {
                    _active.Add(r);
                }
            }
        }
    }

    private void Check(long offset, long length, int ioType)
    {
        lock (_active)
        {
            foreach (var r in _active)
            {
                if ((r.IoTypeMask & ioType) == 0)
                {
                    continue;
                }
                if (r.Sector >= 0 && (r.Sector * 512 < offset || r.Sector * 512 >= offset + Math.Max(length, 1)))
                {
                    continue;
                }
                if (r.Once)
                {
                    _active.Remove(r);
                    _rules.Remove(r);
                }
                throw Posix.LibC.ErrnoException(r.Errno);
            }
        }
    }

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        Fire("read_aio");
        Check(offset, buffer.Length, BlkdebugDriver.IoRead);
        return _image.ReadAsync(offset, buffer, cancellationToken);
    }

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        Fire("pwritev");
        Fire("write_aio");
        Check(offset, data.Length, BlkdebugDriver.IoWrite);
        return _image.WriteAsync(offset, data, flags, cancellationToken);
    }

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        Fire("pwritev_zero");
        Check(offset, length, BlkdebugDriver.IoWriteZeroes);
        return _image.WriteZeroesAsync(offset, length, flags, cancellationToken);
    }

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        Check(offset, length, BlkdebugDriver.IoDiscard);
        return _image.DiscardAsync(offset, length, cancellationToken);
    }

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken)
    {
        Fire("flush_to_disk");
        Check(0, 0, BlkdebugDriver.IoFlush);
        return _image.FlushAsync(cancellationToken);
    }

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        Check(offset, length, BlkdebugDriver.IoBlockStatus);
        return _image.GetBlockStatusAsync(offset, length, cancellationToken);
    }

    public override ImageInfo GetImageInfo() => _image.GetImageInfo() with { Format = DriverName };

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}
