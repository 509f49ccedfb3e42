using Backup.Block.Bitmaps;
using Backup.Block.Copy;

namespace Backup.Block.Drivers.CopyBeforeWrite;

/// <summary>
/// blockdev-add driver=copy-before-write (QAPI BlockdevOptionsCbw): <c>file</c> (the node guests write),
/// <c>target</c> (where old data goes), <c>bitmap</c> {node, name} (only what it marks is copied; default
/// everything), <c>on-cbw-error</c> (break-guest-write, the default, or break-snapshot) and
/// <c>cbw-timeout</c> (seconds a guest write waits for its copy; 0 or absent: no limit) and
/// <c>min-cluster-size</c> (the smallest copy unit, QEMU 9.2). Checks in QEMU's
/// order (cbw_open): the children, the target's write permission, then the bitmap.
/// </summary>
public sealed class CopyBeforeWriteDriver : IBlockDriver
{
    public string Name => "copy-before-write";

    public async ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var file = (await context.Graph.OpenChildAsync(context, "file", required: true, cancellationToken).ConfigureAwait(false))!;
        var target = (await context.Graph.OpenChildAsync(context, "target", required: true, cancellationToken).ConfigureAwait(false))!;
        if (target.ReadOnly)
        {
            // QEMU's permission check: the filter takes write on its target.
            throw new BlockException("Block node is read-only");
        }
        HBitmap? bitmap = null;
        if (context.Options.GetDict("bitmap") is { } b)
        {
            var nodeName = b.GetString("node")!;
            var node = context.Graph.Find(nodeName) ?? throw new BlockException($"Node '{nodeName}' not found");
            bitmap = (node.TryGetDirtyBitmaps()?.Find(b.GetString("name")!)
                ?? throw new BlockException($"Dirty bitmap '{b.GetString("name")}' not found")).Bits;
        }
        var onError = context.Options.GetString("on-cbw-error") == "break-snapshot" ? OnCbwError.BreakSnapshot : OnCbwError.BreakGuestWrite;
        var timeout = TimeSpan.FromSeconds(context.Options.GetInt64("cbw-timeout") ?? 0);
        var minClusterSize = MinClusterSize(context.Options);
        BlockCopy.CheckMinClusterSize(minClusterSize);
        var copy = new BlockCopy(file, target, new BlockCopyOptions { MinClusterSize = (long)minClusterSize }, bitmap);
        return new CopyBeforeWriteNode(context, file, target, copy, onError, timeout);
    }

    private static ulong MinClusterSize(BlockOptions options) => options["min-cluster-size"] switch
    {
        ulong u => u,
        long l => (ulong)l,
        int i => (ulong)i,
        _ => 0,
    };
}
