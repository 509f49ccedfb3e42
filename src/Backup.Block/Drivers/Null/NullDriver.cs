namespace Backup.Block.Drivers.Null;

/// <summary>
/// The <c>null-co</c> and <c>null-aio</c> protocol drivers (QEMU's block/null.c): a node of a given size
/// that stores nothing. Writes, write-zeroes and discards succeed and are dropped; reads return zeros
/// (see <see cref="NullNode"/>). QEMU's tests use it as the fast scratch target of a backup. The two
/// drivers differ in QEMU only in how a request completes (coroutine or AIO callback), which a .NET
/// caller cannot tell apart, so both are one node type with its own driver name.
/// </summary>
public sealed class NullDriver(string name) : IBlockDriver
{
    /// <summary>QEMU's default size: 1 GiB.</summary>
    public const long DefaultSize = 1L << 30;

    public static NullDriver Co { get; } = new("null-co");

    public static NullDriver Aio { get; } = new("null-aio");

    public string Name { get; } = name;

    public ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var size = context.Options.GetInt64("size") ?? DefaultSize;
        if (size < 0)
        {
            // QSD 7.2 aborts on a negative size (parse_option_size); refuse it with QEMU's text instead.
            throw new BlockException("Parameter 'size' expects a non-negative number below 2^64");
        }
        var latencyNs = context.Options.GetInt64("latency-ns") ?? 0;
        if (latencyNs < 0)
        {
            throw new BlockException("latency-ns is invalid");
        }
        var readZeroes = context.Options.GetBool("read-zeroes") ?? false;
        return ValueTask.FromResult<BlockNode>(new NullNode(context, Name, size, latencyNs, readZeroes,
            NullFilename.For(Name, context.Options)));
    }
}
