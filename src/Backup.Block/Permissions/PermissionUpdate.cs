namespace Backup.Block.Permissions;

/// <summary>
/// Recomputes every node's permissions after the graph changed (QEMU's bdrv_refresh_perms): parents
/// before children, each node's uses checked pairwise for conflicts, then the node's combined masks
/// offered to its driver (the file driver takes lock bytes). All or nothing: if any node refuses, the
/// nodes already prepared are rolled back and the committed state is left as it was.
/// </summary>
internal static class PermissionUpdate
{
    public static void Refresh(IReadOnlyList<BlockNode> nodes, IReadOnlyDictionary<BlockNode, List<BlockUse>> uses)
    {
        var proposed = new Dictionary<BlockNode, (BlockPermissions Perm, BlockPermissions Shared)>();
        (BlockPermissions, BlockPermissions) StateOf(BlockNode parent) =>
            proposed.TryGetValue(parent, out var s) ? s : (parent.Permissions, parent.SharedPermissions);

        var prepared = new List<BlockNode>();
        try
        {
            foreach (var node in TopologicalOrder(nodes, uses))
            {
                var state = Combine(node, uses.GetValueOrDefault(node), StateOf);
                proposed[node] = state;
                if (state != (node.Permissions, node.SharedPermissions))
                {
                    node.PreparePermissions(state.Perm, state.Shared);
                    prepared.Add(node);
                }
            }
        }
        catch
        {
            for (var i = prepared.Count - 1; i >= 0; i--)
            {
                prepared[i].AbortPermissions();
            }
            throw;
        }
        foreach (var node in prepared)
        {
            node.CommitPermissions();
        }
    }

    /// <summary>
    /// Checks that the uses of one node tolerate each other and returns what they take together and
    /// what all of them share. Newest use first on both sides, as QEMU walks bs->parents.
    /// </summary>
    public static (BlockPermissions Perm, BlockPermissions Shared) Combine(BlockNode node, List<BlockUse>? uses,
        Func<BlockNode, (BlockPermissions, BlockPermissions)> parentState)
    {
        if (uses is null || uses.Count == 0)
        {
            return (BlockPermissions.None, BlockPermissions.All);
        }
        var ordered = uses.OrderByDescending(u => u.Stamp).ToArray();
        var masks = new (BlockPermissions Perm, BlockPermissions Shared)[ordered.Length];
        for (var i = 0; i < ordered.Length; i++)
        {
            masks[i] = ordered[i].Compute(parentState);
            if (node.ForceShare && ordered[i] is EdgeUse)
            {
                // QEMU's bdrv_child_perm: a force-share child is shared whole by its parent nodes.
                masks[i].Shared = BlockPermissions.All;
            }
        }
        var perm = BlockPermissions.None;
        var shared = BlockPermissions.All;
        for (var a = 0; a < ordered.Length; a++)
        {
            for (var b = 0; b < ordered.Length; b++)
            {
                if (a != b && (masks[b].Perm & ~masks[a].Shared) != 0)
                {
                    throw PermissionConflictException.Between(node.NodeName, ordered[a], masks[a].Shared, ordered[b], masks[b].Perm);
                }
            }
            perm |= masks[a].Perm;
            shared &= masks[a].Shared;
        }
        return (perm, shared);
    }

    /// <summary>Parents before children (Kahn's algorithm over the bound edges).</summary>
    private static List<BlockNode> TopologicalOrder(IReadOnlyList<BlockNode> nodes, IReadOnlyDictionary<BlockNode, List<BlockUse>> uses)
    {
        var set = new HashSet<BlockNode>(nodes);
        var pendingParents = new Dictionary<BlockNode, int>();
        var childrenOf = new Dictionary<BlockNode, List<BlockNode>>();
        foreach (var n in nodes)
        {
            var count = 0;
            foreach (var u in uses.GetValueOrDefault(n) ?? [])
            {
                if (u is EdgeUse { Parent: { } p } && set.Contains(p))
                {
                    count++;
                    if (!childrenOf.TryGetValue(p, out var list))
                    {
                        childrenOf[p] = list = [];
                    }
                    list.Add(n);
                }
            }
            pendingParents[n] = count;
        }
        var ready = new Queue<BlockNode>(nodes.Where(n => pendingParents[n] == 0));
        var order = new List<BlockNode>(nodes.Count);
        while (ready.TryDequeue(out var n))
        {
            order.Add(n);
            foreach (var c in childrenOf.GetValueOrDefault(n) ?? [])
            {
                if (--pendingParents[c] == 0)
                {
                    ready.Enqueue(c);
                }
            }
        }
        // A cycle cannot be built through the graph's API; should one exist, its nodes still get checked.
        order.AddRange(nodes.Where(n => !order.Contains(n)));
        return order;
    }
}
