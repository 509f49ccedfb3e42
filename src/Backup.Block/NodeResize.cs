namespace Backup.Block;

/// <summary>
/// <c>block_resize</c> (QEMU's qmp_block_resize): the checks in QEMU's order and words, then the node's
/// one resize path (<see cref="BlockNode.TruncateAsync"/>) inside a drained section.
/// </summary>
/// <remarks>
/// backupd has no permission model on graph edges yet; the two checks QEMU makes before resizing are
/// derived from the graph instead. The op blocker: a job's target (or a node a job otherwise holds) and
/// a backing node cannot be resized. The RESIZE permission: a parent that needs its child's size fixed
/// (<see cref="BlockNode.SharesResize"/> false: qcow2's file, a raw window, a backup's filter), a parent
/// that passes the restriction down from its own parents or exports (a plain raw node, blkdebug), or an
/// export on the node itself refuses it, with QEMU's "Permission conflict" text naming that parent.
/// </remarks>
public static class NodeResize
{
    public static async ValueTask ResizeAsync(BlockGraph graph, string? device, string? nodeName, long size,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(graph);
        // QSD has no devices (BlockBackends with names): 'device' never finds a node.
        var node = (nodeName is null ? null : graph.Find(nodeName))
            ?? throw new BlockException($"Cannot find device='{device}' nor node-name='{nodeName}'");
        if (size < 0)
        {
            throw new BlockException("Parameter 'size' expects a >0 size");
        }
        if (IsOpBlocked(graph, node))
        {
            // QEMU prints the device argument here, "(null)" when there is none.
            throw new BlockException($"Device '{device ?? "(null)"}' is in use");
        }
        if (FindResizeConflict(graph, node) is { } conflict)
        {
            throw new BlockException($"Permission conflict on node '{node.NodeName}': permissions 'resize' are both required " +
                $"by an unnamed block device (uses node '{node.NodeName}' as 'root' child) and unshared by {conflict}.");
        }
        using (await node.QuiesceAsync(cancellationToken).ConfigureAwait(false))
        {
            await node.TruncateAsync(size, cancellationToken).ConfigureAwait(false);
        }
    }

    /// <summary>QEMU's BLOCK_OP_TYPE_RESIZE blockers: jobs block their nodes, parents block their backing node.</summary>
    private static bool IsOpBlocked(BlockGraph graph, BlockNode node) =>
        node.IsJobTarget ||
        (node.BusyReason?.Contains("job", StringComparison.Ordinal) ?? false) ||
        graph.ParentsOf(node).Any(p => p.Children.Any(c => c.Role == "backing" && ReferenceEquals(c.Node, node)));

    /// <summary>Who does not share RESIZE on <paramref name="node"/>, in QEMU's words, or null.</summary>
    private static string? FindResizeConflict(BlockGraph graph, BlockNode node)
    {
        foreach (var parent in graph.ParentsOf(node))
        {
            foreach (var edge in parent.Children)
            {
                if (ReferenceEquals(edge.Node, node) &&
                    (!parent.SharesResize(edge) || FindResizeConflict(graph, parent) is not null))
                {
                    return $"node '{parent.NodeName}' (uses node '{node.NodeName}' as '{edge.Role}' child)";
                }
            }
        }
        // An export's block backend takes the node's size as fixed.
        return node.BusyReason is not null ? $"an unnamed block device (uses node '{node.NodeName}' as 'root' child)" : null;
    }
}
