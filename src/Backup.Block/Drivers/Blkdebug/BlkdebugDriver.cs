namespace Backup.Block.Drivers.Blkdebug;

/// <summary>
/// The <c>blkdebug</c> filter (QEMU's block/blkdebug.c, behaviour only): passes requests to its
/// <c>image</c> child, and fails those that an active <c>inject-error</c> rule matches. Rules become
/// active on blkdebug events, which other nodes raise on this one (see <see cref="BlkdebugEvent"/>):
/// a format above raises <c>read_aio</c>/<c>write_aio</c> and its metadata steps, the generic I/O path
/// raises <c>pwritev</c>, <c>pwritev_zero</c>, <c>pwritev_done</c>, <c>flush_to_os</c> and
/// <c>flush_to_disk</c>, and the node raises <c>none</c> itself when it opens.
/// </summary>
public sealed class BlkdebugDriver : IBlockDriver
{
    public string Name => "blkdebug";

    public async ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var options = BlkdebugOptions.Parse(context.Options, ReadConfigFile);
        var image = (await context.Graph.OpenChildAsync(context, "image", required: true, cancellationToken).ConfigureAwait(false))!;
        var node = new BlkdebugNode(context, image, options);
        await node.DebugEventAsync(BlkdebugEvent.None).ConfigureAwait(false);
        return node;
    }

    private static string ReadConfigFile(string path)
    {
        try
        {
            return System.IO.File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Could not read blkdebug config file: {Posix.LibC.Describe(Posix.LibC.ErrnoOf(e))}");
        }
    }
}
