using Backup.Block;

namespace Backup.Diagnostics.QemuIo.Commands;

/// <summary>
/// qemu-io talks to a BlockBackend, which refuses a request that does not fit in the node with EIO
/// (blk_check_byte_request) before the node sees it, even on a protocol node that could grow.
/// </summary>
internal static class BackendRange
{
    public static void Check(BlockNode node, long offset, long bytes)
    {
        var length = node.Length;
        if (offset > length || length - offset < bytes)
        {
            throw new IOException($"Request offset {offset} length {bytes} is outside node '{node.NodeName}'", Errno.EIO);
        }
    }
}
