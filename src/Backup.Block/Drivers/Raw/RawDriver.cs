namespace Backup.Block.Drivers.Raw;

/// <summary>
/// The <c>raw</c> format driver: the guest sees the bytes of its file child, optionally a window of
/// it (<c>offset</c>, <c>size</c>).
/// </summary>
public sealed class RawDriver : IBlockDriver
{
    public string Name => "raw";

    public async ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var file = (await context.Graph.OpenChildAsync(context, "file", required: true, cancellationToken).ConfigureAwait(false))!;
        var offset = context.Options.GetInt64("offset") ?? 0;
        var size = context.Options.GetInt64("size");
        var fileSize = file.Length;
        if (offset < 0 || offset > fileSize)
        {
            throw new BlockException($"Offset ({offset}) cannot be greater than size of the containing file ({fileSize})");
        }
        if (size is { } s)
        {
            if (s % 512 != 0)
            {
                throw new BlockException("Specified size is not multiple of 512");
            }
            if (s < 0 || offset + s > fileSize)
            {
                throw new BlockException("The sum of offset (" + offset + ") and size (" + s +
                    ") has to be smaller or equal to the  actual size of the containing file (" + fileSize + ")");
            }
        }
        return new RawNode(context, file, offset, size);
    }
}
