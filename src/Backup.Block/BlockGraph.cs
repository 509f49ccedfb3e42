using Backup.Block.Objects;
using Backup.Block.Permissions;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Backup.Block;

/// <summary>Opens one kind of node from its options.</summary>
public interface IBlockDriver
{
    /// <summary>The <c>driver</c> value that selects this driver.</summary>
    string Name { get; }

    /// <summary>
    /// Opens the node. Children are opened through <see cref="BlockGraph.OpenChildAsync"/>; if opening
    /// fails after that, the graph releases the children it made for this node.
    /// </summary>
    ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken);
}

/// <summary>
/// The nodes the daemon owns, by unique node-name, and the edges between them. Top-level nodes are
/// added by the user (--blockdev, blockdev-add); nodes given inline as children get generated names
/// and belong to their parent: they go when it goes.
/// </summary>
public sealed class BlockGraph
{
    /// <summary>QEMU keeps node names in a 32-byte buffer.</summary>
    public const int MaxNodeNameLength = 31;

    private readonly Lock _lock = new();
    private readonly List<BlockNode> _nodes = [];
    private readonly Dictionary<string, BlockNode> _byName = new(StringComparer.Ordinal);
    private readonly Dictionary<BlockNode, List<BlockNode>> _parents = [];
    private readonly HashSet<BlockNode> _userAdded = [];
    private readonly Dictionary<BlockNode, List<BlockUse>> _uses = [];
    private readonly Dictionary<string, IBlockDriver> _drivers = new(StringComparer.Ordinal);
    private long _implicitNameCounter;

    public BlockGraph(IEnumerable<IBlockDriver> drivers)
    {
        ArgumentNullException.ThrowIfNull(drivers);
        foreach (var d in drivers)
        {
            _drivers.Add(d.Name, d);
        }
    }

    /// <summary>A graph with the drivers this assembly provides.</summary>
    public static BlockGraph CreateDefault() => new(BuiltinDrivers.All);

    /// <summary>Where the graph tells which nodes open and close (debug), with the node name as a property.</summary>
    public ILogger Logger { get; init; } = NullLogger.Instance;

    /// <summary>The daemon's objects (/objects), where drivers find what options name by id (the nbd driver's tls-creds).</summary>
    public ObjectRegistry Objects { get; init; } = new();

    public IReadOnlyCollection<string> DriverNames => _drivers.Keys;

    /// <summary>Every node, newest first (the order query-named-block-nodes lists them in).</summary>
    public IReadOnlyList<BlockNode> Nodes
    {
        get
        {
            lock (_lock)
            {
                var list = _nodes.ToList();
                list.Reverse();
                return list;
            }
        }
    }

    /// <summary>Nodes that no other node uses as a child (what a guest or a backup would attach to).</summary>
    public IReadOnlyList<BlockNode> RootNodes
    {
        get
        {
            lock (_lock)
            {
                var roots = _nodes.Where(n => _parents[n].Count == 0).ToList();
                roots.Reverse();
                return roots;
            }
        }
    }

    public BlockNode? Find(string nodeName)
    {
        lock (_lock)
        {
            return _byName.GetValueOrDefault(nodeName);
        }
    }

    /// <summary>A node by name, or QEMU's error for a device or node that does not exist (bdrv_lookup_bs).</summary>
    public BlockNode Get(string name) =>
        Find(name) ?? throw new BlockException($"Cannot find device='{name}' nor node-name='{name}'");

    /// <summary>Parents of a node: the nodes that hold it as a child.</summary>
    public IReadOnlyList<BlockNode> ParentsOf(BlockNode node)
    {
        lock (_lock)
        {
            return _parents.TryGetValue(node, out var p) ? p.ToList() : [];
        }
    }

    /// <summary>Opens a node the user asked for (--blockdev, blockdev-add). It must carry a node-name.</summary>
    public async ValueTask<BlockNode> AddAsync(BlockOptions options, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.NodeName is null)
        {
            throw new BlockException("'node-name' must be specified for the root node");
        }
        var node = await OpenAsync(options, inherited: null, cancellationToken).ConfigureAwait(false);
        lock (_lock)
        {
            _userAdded.Add(node);
        }
        return node;
    }

    /// <summary>
    /// Opens a node the daemon itself owns (drive-backup's target): a generated name unless the options
    /// carry one, not deletable with blockdev-del. Close it with <see cref="ReleaseAsync"/>.
    /// </summary>
    public ValueTask<BlockNode> OpenOwnedAsync(BlockOptions options, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        return OpenAsync(options, inherited: null, cancellationToken);
    }

    /// <summary>Closes a node opened with <see cref="OpenOwnedAsync"/> once nothing holds it, with its inline children.</summary>
    public async ValueTask ReleaseAsync(BlockNode node)
    {
        ArgumentNullException.ThrowIfNull(node);
        lock (_lock)
        {
            if (!_parents.TryGetValue(node, out var parents) || parents.Count > 0 || _userAdded.Contains(node))
            {
                return;
            }
        }
        await DetachAsync(node).ConfigureAwait(false);
    }

    /// <summary>
    /// Adds a filter node that a job creates above <paramref name="child"/> (QEMU's bdrv_cbw_append):
    /// named <paramref name="nodeName"/> or generated, with the child's read-only and cache settings,
    /// linked to the child so the child cannot be deleted under it. Nothing to open, so this is
    /// synchronous; <see cref="RemoveFilter"/> takes it out again.
    /// </summary>
    public BlockNode InsertFilter(string? nodeName, BlockNode child, Func<NodeContext, BlockNode> create)
    {
        ArgumentNullException.ThrowIfNull(child);
        ArgumentNullException.ThrowIfNull(create);
        lock (_lock)
        {
            string name;
            if (nodeName is not null)
            {
                ValidateNodeName(nodeName);
                if (_byName.ContainsKey(nodeName))
                {
                    throw new BlockException($"Duplicate nodes with node-name='{nodeName}'");
                }
                name = nodeName;
            }
            else
            {
                do
                {
                    name = $"#block{_implicitNameCounter++:D3}";
                }
                while (_byName.ContainsKey(name));
            }
            var node = create(new NodeContext
            {
                NodeName = name,
                IsImplicitName = nodeName is null,
                ReadOnly = child.ReadOnly,
                CacheDirect = child.CacheDirect,
                CacheNoFlush = child.CacheNoFlush,
                Discard = child.Discard,
                Graph = this,
                Options = new BlockOptions(),
            });
            _nodes.Add(node);
            _byName.Add(name, node);
            _parents.Add(node, []);
            Link(node);
            try
            {
                RefreshPermissions();
            }
            catch
            {
                Unlink(node);
                ReleasePermissions();
                throw;
            }
            Logger.LogDebug("node {Node}: {Driver} filter inserted above node {Child}", name, node.DriverName, child.NodeName);
            return node;
        }
    }

    /// <summary>Takes out a filter added with <see cref="InsertFilter"/>; its children stay. The caller ends what the filter holds.</summary>
    public void RemoveFilter(BlockNode filter)
    {
        ArgumentNullException.ThrowIfNull(filter);
        lock (_lock)
        {
            if (!_byName.TryGetValue(filter.NodeName, out var found) || !ReferenceEquals(found, filter))
            {
                return;
            }
            Unlink(filter);
            ReleasePermissions();
        }
        Logger.LogDebug("node {Node}: {Driver} filter removed", filter.NodeName, filter.DriverName);
    }

    /// <summary>Takes a node out of the name tables and its edges out of its children (graph lock held).</summary>
    private void Unlink(BlockNode node)
    {
        _nodes.Remove(node);
        _byName.Remove(node.NodeName);
        _parents.Remove(node);
        _uses.Remove(node);
        foreach (var c in node.Children)
        {
            if (_parents.TryGetValue(c.Node, out var parents))
            {
                parents.Remove(node);
            }
            _uses.GetValueOrDefault(c.Node)?.RemoveAll(u => u is EdgeUse e && ReferenceEquals(e.Parent, node));
        }
    }

    /// <summary>
    /// Opens the child <paramref name="key"/> of a node being opened: a reference to an existing node by
    /// name, or nested options for a new node that inherits the parent's read-only and cache settings.
    /// Returns null when the key is absent and not <paramref name="required"/>.
    /// </summary>
    public async ValueTask<BlockNode?> OpenChildAsync(NodeContext parent, string key, bool required,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(parent);
        BlockNode child;
        switch (parent.Options[key])
        {
            case string reference:
                child = Get(reference);
                break;
            case BlockOptions nested:
                child = await OpenAsync(nested, parent, cancellationToken).ConfigureAwait(false);
                break;
            case null when required:
                throw new BlockException($"A block device must be specified for \"{key}\"");
            default:
                return null;
        }
        // The parent takes its permissions on the child now, before its driver reads or writes through
        // the edge (QEMU attaches the child with its permissions inside bdrv_open_child).
        var edge = new EdgeUse(parent.NodeName, !parent.ReadOnly, key, ChildKinds.Of(parent.Options.GetString("driver"), key));
        lock (_lock)
        {
            AddUse(child, edge);
            try
            {
                RefreshPermissions();
            }
            catch
            {
                _uses[child].Remove(edge);
                throw;
            }
        }
        return child;
    }

    /// <summary>
    /// Attaches a user from outside the graph (an export, a job) with what it takes and shares; fails with
    /// QEMU's permission conflict or lock error. Dispose the result to detach it. Like QEMU's BlockBackend
    /// it is attached sharing everything first and then narrowed, which decides how a conflict is worded.
    /// </summary>
    public IDisposable AttachUser(BlockNode node, ExternalUse use)
    {
        ArgumentNullException.ThrowIfNull(node);
        ArgumentNullException.ThrowIfNull(use);
        lock (_lock)
        {
            var shared = use.Shared;
            use.Shared = BlockPermissions.All;
            AddUse(node, use);
            try
            {
                RefreshPermissions();
                use.Shared = shared;
                RefreshPermissions();
            }
            catch
            {
                _uses[node].Remove(use);
                ReleasePermissions();
                throw;
            }
        }
        return new AttachedUser(this, node, use);
    }

    /// <summary>The uses of a node, newest first (its parents' edges and its external users).</summary>
    public IReadOnlyList<BlockUse> UsesOf(BlockNode node)
    {
        lock (_lock)
        {
            return _uses.TryGetValue(node, out var list) ? list.OrderByDescending(u => u.Stamp).ToList() : [];
        }
    }

    private void DetachUser(BlockNode node, ExternalUse use)
    {
        lock (_lock)
        {
            if (_uses.TryGetValue(node, out var list) && list.Remove(use))
            {
                ReleasePermissions();
            }
        }
    }

    private void AddUse(BlockNode node, BlockUse use)
    {
        if (!_uses.TryGetValue(node, out var list))
        {
            _uses[node] = list = [];
        }
        list.Add(use);
    }

    /// <summary>Recomputes every node's permissions; throws (and changes nothing) on a conflict. Graph lock held.</summary>
    private void RefreshPermissions() => PermissionUpdate.Refresh(_nodes, _uses);

    /// <summary>
    /// Refresh after a use went away: it only gives permissions back, so it should not fail; if a lock
    /// cannot be dropped the node keeps it, as QEMU ignores unlock errors. Graph lock held.
    /// </summary>
    private void ReleasePermissions()
    {
        try
        {
            RefreshPermissions();
        }
        catch (BlockException)
        {
        }
    }

    private sealed class AttachedUser(BlockGraph graph, BlockNode node, ExternalUse use) : IDisposable
    {
        private int _disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                graph.DetachUser(node, use);
            }
        }
    }

    /// <summary>Records that <paramref name="parent"/> now holds <paramref name="child"/>; called by the graph after a driver opened.</summary>
    private void Link(BlockNode parent)
    {
        foreach (var c in parent.Children)
        {
            _parents[c.Node].Add(parent);
            // Bind the edge the parent took while it opened, or make one (a filter made by a job).
            var edge = _uses.GetValueOrDefault(c.Node)?.OfType<EdgeUse>()
                .FirstOrDefault(e => e.Parent is null && e.ParentName == parent.NodeName && e.Role == c.Role);
            if (edge is null)
            {
                edge = new EdgeUse(parent.NodeName, !parent.ReadOnly, c.Role, ChildKinds.Of(parent.DriverName, c.Role));
                AddUse(c.Node, edge);
            }
            edge.Parent = parent;
        }
        // Children the driver opened but did not keep.
        DropPendingEdges(parent.NodeName);
    }

    /// <summary>Removes the edges a parent that is still opening took (graph lock held).</summary>
    private void DropPendingEdges(string parentName)
    {
        foreach (var list in _uses.Values)
        {
            list.RemoveAll(u => u is EdgeUse { Parent: null } e && e.ParentName == parentName);
        }
    }

    private async ValueTask<BlockNode> OpenAsync(BlockOptions options, NodeContext? inherited, CancellationToken cancellationToken)
    {
        var driverName = options.Driver;
        if (!_drivers.TryGetValue(driverName, out var driver))
        {
            throw new BlockException($"Unknown driver '{driverName}'");
        }
        var explicitName = options.NodeName;
        string name;
        lock (_lock)
        {
            if (explicitName is not null)
            {
                ValidateNodeName(explicitName);
                if (_byName.ContainsKey(explicitName))
                {
                    throw new BlockException($"Duplicate nodes with node-name='{explicitName}'");
                }
                name = explicitName;
            }
            else
            {
                do
                {
                    name = $"#block{_implicitNameCounter++:D3}";
                }
                while (_byName.ContainsKey(name));
            }
        }

        var cache = options.GetDict("cache");
        var context = new NodeContext
        {
            NodeName = name,
            IsImplicitName = explicitName is null,
            ReadOnly = options.GetBool("read-only") ?? inherited?.ReadOnly ?? false,
            // Inherited by inline children, as QEMU's bdrv_inherited_options copies it.
            ForceShare = options.GetBool("force-share") ?? inherited?.ForceShare ?? false,
            CacheDirect = cache?.GetBool("direct") ?? inherited?.CacheDirect ?? false,
            CacheNoFlush = cache?.GetBool("no-flush") ?? inherited?.CacheNoFlush ?? false,
            Discard = ParseDiscard(options.GetString("discard")) ?? inherited?.Discard ?? DiscardMode.Ignore,
            DetectZeroes = ParseDetectZeroes(options.GetString("detect-zeroes")),
            Graph = this,
            Options = options,
        };

        if (context.ForceShare && !context.ReadOnly)
        {
            throw new BlockException("force-share=on can only be used with read-only images");
        }

        var before = SnapshotNames();
        BlockNode node;
        try
        {
            node = await driver.OpenAsync(context, cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            lock (_lock)
            {
                DropPendingEdges(name);
                ReleasePermissions();
            }
            await ReleaseOrphansSinceAsync(before).ConfigureAwait(false);
            throw;
        }

        lock (_lock)
        {
            if (_byName.ContainsKey(name))
            {
                // Lost a race with a concurrent open of the same name; undo ours.
                DropPendingEdges(name);
                ReleasePermissions();
                node.CloseAsync().AsTask().GetAwaiter().GetResult();
                throw new BlockException($"Duplicate nodes with node-name='{name}'");
            }
            _nodes.Add(node);
            _byName.Add(name, node);
            _parents.Add(node, []);
            Link(node);
            // The new node has no users yet, so its edges take what they took while it opened: no change.
            RefreshPermissions();
        }
        Logger.LogDebug("node {Node}: opened ({Driver}, {Size} bytes{ReadOnly})", name, node.DriverName, node.Length,
            node.ReadOnly ? ", read-only" : "");
        return node;
    }

    /// <summary>
    /// blockdev-del: removes a node the user added. Fails while another node holds it as a child or
    /// something outside the graph (a job, an export) uses it. Inline children go with it.
    /// </summary>
    public async ValueTask RemoveAsync(string nodeName)
    {
        BlockNode? node;
        lock (_lock)
        {
            node = _byName.GetValueOrDefault(nodeName)
                ?? throw new BlockException($"Failed to find node with node-name='{nodeName}'");
            if (!_userAdded.Contains(node))
            {
                // Nodes opened inline belong to their parent and go with it.
                throw new BlockException($"Node {nodeName} is not owned by the monitor");
            }
            CheckRemovable(node);
            _userAdded.Remove(node);
        }
        await DetachAsync(node).ConfigureAwait(false);
    }

    private void CheckRemovable(BlockNode node)
    {
        // QEMU's bdrv_has_blk, checked first: an export (a BlockBackend on the node) holds it.
        if (_uses.TryGetValue(node, out var uses) && uses.Exists(u => u is ExternalUse))
        {
            throw new BlockException($"Node {node.NodeName} is in use");
        }
        // A job's block (a backup target, also a child of the job's filter) is an op blocker in QEMU,
        // checked before the node's other users.
        if (node.IsJobTarget && node.BusyReason is { } jobReason)
        {
            throw new BlockException($"Node '{node.NodeName}' is busy: {jobReason}");
        }
        if (_parents[node].Count > 0)
        {
            throw new BlockException($"Block device {node.NodeName} is in use");
        }
        if (node.BusyReason is { } reason)
        {
            throw new BlockException($"Node '{node.NodeName}' is busy: {reason}");
        }
    }

    /// <summary>Closes a node that nothing holds any more, then its children that are left unowned.</summary>
    private async ValueTask DetachAsync(BlockNode node)
    {
        lock (_lock)
        {
            _nodes.Remove(node);
            _byName.Remove(node.NodeName);
            _parents.Remove(node);
        }
        try
        {
            await node.CloseAsync().ConfigureAwait(false);
            Logger.LogDebug("node {Node}: closed", node.NodeName);
        }
        catch (Exception e) when (e is IOException or BlockException)
        {
            // As QEMU's bdrv_close: a node whose write-back fails (a target that returns EIO) is closed
            // anyway and the failure is only reported; its children are still released, and a shutdown
            // still closes every other node cleanly, storing their bitmaps.
            Logger.LogError("node '{Node}' closed with an error; its image may have leaked clusters: {Error}", node.NodeName, e.Message);
        }
        lock (_lock)
        {
            _uses.Remove(node);
            foreach (var child in node.Children)
            {
                _uses.GetValueOrDefault(child.Node)?.RemoveAll(u => u is EdgeUse e && ReferenceEquals(e.Parent, node));
            }
            ReleasePermissions();
        }
        foreach (var child in node.Children)
        {
            bool orphan;
            lock (_lock)
            {
                if (!_parents.TryGetValue(child.Node, out var parents))
                {
                    continue;
                }
                parents.Remove(node);
                orphan = parents.Count == 0 && !_userAdded.Contains(child.Node) && child.Node.BusyReason is null;
            }
            if (orphan)
            {
                await DetachAsync(child.Node).ConfigureAwait(false);
            }
        }
    }

    private HashSet<string> SnapshotNames()
    {
        lock (_lock)
        {
            return [.. _byName.Keys];
        }
    }

    /// <summary>After a failed open, closes the inline children that were opened for it.</summary>
    private async ValueTask ReleaseOrphansSinceAsync(HashSet<string> before)
    {
        List<BlockNode> orphans;
        lock (_lock)
        {
            orphans = _nodes.Where(n => !before.Contains(n.NodeName) && _parents[n].Count == 0 && !_userAdded.Contains(n)).ToList();
        }
        foreach (var n in orphans)
        {
            await DetachAsync(n).ConfigureAwait(false);
        }
    }

    /// <summary>Closes every node, parents before children (daemon shutdown).</summary>
    public async ValueTask CloseAllAsync()
    {
        while (true)
        {
            BlockNode? root;
            lock (_lock)
            {
                root = _nodes.LastOrDefault(n => _parents[n].Count == 0);
                if (root is null)
                {
                    return;
                }
                _userAdded.Remove(root);
            }
            await DetachAsync(root).ConfigureAwait(false);
        }
    }

    /// <summary>QEMU's id_wellformed plus the node-name length limit.</summary>
    public static void ValidateNodeName(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (!Identifier.IsWellFormed(name))
        {
            throw new BlockException("Invalid node-name: '" + name + "'");
        }
        if (name.Length > MaxNodeNameLength)
        {
            throw new BlockException("Node name too long");
        }
    }

    /// <summary>QEMU's id_wellformed, for object and job ids.</summary>
    public static void ValidateObjectId(string id)
    {
        ArgumentNullException.ThrowIfNull(id);
        if (!Identifier.IsWellFormed(id))
        {
            throw new BlockException($"Parameter 'id' expects an identifier");
        }
    }

    private static DiscardMode? ParseDiscard(string? value) => value switch
    {
        null => null,
        "ignore" or "off" => DiscardMode.Ignore,
        "unmap" or "on" => DiscardMode.Unmap,
        _ => throw new BlockException($"Invalid discard option '{value}'"),
    };

    private static DetectZeroesMode ParseDetectZeroes(string? value) => value switch
    {
        null or "off" => DetectZeroesMode.Off,
        "on" => DetectZeroesMode.On,
        "unmap" => DetectZeroesMode.Unmap,
        _ => throw new BlockException($"Parameter 'detect-zeroes' does not accept value '{value}'"),
    };
}
