using Backup.Block;
using Backup.Nbd.Protocol;

namespace Backup.Nbd.Exports;

/// <summary>What block-export-add (type nbd) or nbd-server-add asks for, already checked against the schema.</summary>
public sealed record NbdExportOptions
{
    public required string Id { get; init; }
    public required string NodeName { get; init; }

    /// <summary>The export name clients ask for; defaults to the node name.</summary>
    public string? Name { get; init; }

    public string? Description { get; init; }
    public bool Writable { get; init; }

    /// <summary>Every write completes only once it is on stable storage (as if FUA were set).</summary>
    public bool Writethrough { get; init; }

    public bool AllocationDepth { get; init; }
    public IReadOnlyList<ExportBitmapReference> Bitmaps { get; init; } = [];

    /// <summary>nbd-server-add looks the node up as device or node name, with its own error wording.</summary>
    public bool LegacyDeviceLookup { get; init; }
}

/// <summary>
/// One NBD export: a node made visible under a name. It pins the node (blockdev-del fails while it
/// exists), keeps the metadata contexts it offers and the connections using it.
/// </summary>
public sealed class NbdExport
{
    private readonly Lock _lock = new();
    private readonly HashSet<Server.NbdConnection> _connections = [];
    private readonly IDisposable _nodeUser;
    private int _shuttingDown;

    internal NbdExport(NbdExportOptions options, string name, BlockNode node, IReadOnlyList<IExportMetaContext> contexts,
        IDisposable nodeUser, int maxConnections)
    {
        Id = options.Id;
        Name = name;
        Description = options.Description;
        Node = node;
        Writable = options.Writable;
        Writethrough = options.Writethrough;
        Contexts = contexts;
        _nodeUser = nodeUser;
        MaxConnections = maxConnections;
    }

    public string Id { get; }

    public string Name { get; }

    public string? Description { get; }

    public BlockNode Node { get; }

    public bool Writable { get; }

    public bool Writethrough { get; }

    /// <summary>The server's max-connections when the export was made; 1 means no CAN_MULTI_CONN.</summary>
    internal int MaxConnections { get; }

    /// <summary>Metadata contexts offered, in context-id order (the id is the index).</summary>
    public IReadOnlyList<IExportMetaContext> Contexts { get; }

    public bool ShuttingDown => Volatile.Read(ref _shuttingDown) != 0;

    public int ConnectionCount
    {
        get
        {
            lock (_lock)
            {
                return _connections.Count;
            }
        }
    }

    /// <summary>
    /// Transmission flags (proto.md "Transmission flags"), told truthfully: every export flushes, honours
    /// FUA and CACHE; writable ones trim, write zeroes (fast or failing) and share one cache across
    /// connections, so a flush on one connection covers writes completed on all of them (CAN_MULTI_CONN),
    /// unless max-connections is 1 (as in QEMU).
    /// </summary>
    internal ushort TransmissionFlags(bool structuredReplies)
    {
        var flags = (ushort)(NbdWire.NBD_FLAG_HAS_FLAGS | NbdWire.NBD_FLAG_SEND_FLUSH | NbdWire.NBD_FLAG_SEND_FUA |
                             NbdWire.NBD_FLAG_SEND_CACHE);
        if (Writable)
        {
            flags |= NbdWire.NBD_FLAG_SEND_TRIM | NbdWire.NBD_FLAG_SEND_WRITE_ZEROES | NbdWire.NBD_FLAG_SEND_FAST_ZERO;
        }
        else
        {
            flags |= NbdWire.NBD_FLAG_READ_ONLY;
        }
        if (MaxConnections != 1)
        {
            flags |= NbdWire.NBD_FLAG_CAN_MULTI_CONN;
        }
        if (structuredReplies)
        {
            flags |= NbdWire.NBD_FLAG_SEND_DF;
        }
        return flags;
    }

    /// <summary>
    /// Connections whose client is still there. One whose client has already closed its socket does not
    /// count, even before its own reader has seen the end: QSD has noticed such a client by the time a
    /// block-export-del that follows the client's death runs, so a safe delete must not fail on it.
    /// </summary>
    public int LiveConnectionCount
    {
        get
        {
            lock (_lock)
            {
                return _connections.Count(c => !c.PeerGone);
            }
        }
    }

    /// <summary>Registers a connection that finished its handshake on this export; false once the export is going away.</summary>
    internal bool TryAttach(Server.NbdConnection connection)
    {
        lock (_lock)
        {
            if (ShuttingDown)
            {
                return false;
            }
            _connections.Add(connection);
            return true;
        }
    }

    internal void Detach(Server.NbdConnection connection)
    {
        lock (_lock)
        {
            _connections.Remove(connection);
        }
    }

    /// <summary>Marks the export as going away; returns the connections to close. Only the first caller gets true.</summary>
    internal bool BeginShutdown(out List<Server.NbdConnection> connections)
    {
        lock (_lock)
        {
            connections = [.. _connections];
            return Interlocked.Exchange(ref _shuttingDown, 1) == 0;
        }
    }

    /// <summary>Releases the node and the contexts once no connection uses the export any more.</summary>
    internal void Release()
    {
        foreach (var c in Contexts)
        {
            (c as IDisposable)?.Dispose();
        }
        _nodeUser.Dispose();
    }
}
