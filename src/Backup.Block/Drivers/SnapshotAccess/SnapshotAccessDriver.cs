using Backup.Block.Drivers.CopyBeforeWrite;

namespace Backup.Block.Drivers.SnapshotAccess;

/// <summary>
/// blockdev-add driver=snapshot-access (QAPI BlockdevOptionsGenericFormat): <c>file</c> is the node whose
/// snapshot view it serves, a copy-before-write filter. As in QEMU, any node is accepted at open; the
/// I/O of one that has no snapshot view fails with ENOTSUP.
/// </summary>
public sealed class SnapshotAccessDriver : IBlockDriver
{
    public string Name => "snapshot-access";

    public async ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var file = (await context.Graph.OpenChildAsync(context, "file", required: true, cancellationToken).ConfigureAwait(false))!;
        if (file is CopyBeforeWriteNode filter)
        {
            // The view reads saved clusters from the target: they must be there, not in memory.
            await filter.BlockCopy.KeepGuestCopiesInlineAsync().WaitAsync(cancellationToken).ConfigureAwait(false);
        }
        return new SnapshotAccessNode(context, file);
    }
}
