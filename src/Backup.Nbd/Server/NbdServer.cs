using System.Net;
using System.Net.Sockets;
using System.Text;
using Backup.Block;
using Backup.Block.Permissions;
using Backup.Block.Objects;
using Backup.Block.Posix;
using Backup.Block.Security;
using Backup.Nbd.Exports;
using Backup.Nbd.Handshake;
using Backup.Nbd.Protocol;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Backup.Nbd.Server;

/// <summary>
/// The daemon's one NBD server (QEMU's nbd-server-start/-stop) and the NBD exports it serves.
///
/// Lifetime: <see cref="Start"/> binds and starts accepting; <see cref="StopAsync"/> removes every
/// export (each emitting BLOCK_EXPORT_DELETED), drops every connection, closes the listener and removes
/// the Unix socket file. Stop is idempotent, and <see cref="DisposeAsync"/> is Stop, so the host can
/// dispose the server at shutdown whether or not it is running. Start may be called again after Stop.
///
/// Export operations are meant to be called one at a time (QMP commands run serially); the registry is
/// locked anyway so that connections and the host's shutdown can look at it concurrently.
/// </summary>
public sealed class NbdServer : IAsyncDisposable, INbdExportDirectory
{
    /// <summary>QEMU's default since the CVE-2024-7409 fix (also in Debian's 7.2).</summary>
    public const uint DefaultHandshakeMaxSeconds = 10;

    private readonly BlockGraph _graph;
    private readonly Func<IEventSink> _events;
    private readonly IMetaContextProvider _bitmaps;
    private readonly ILogger _logger;
    private readonly Lock _lock = new();
    private readonly List<NbdExport> _exports = [];
    private readonly HashSet<NbdConnection> _connections = [];

    private Socket? _listener;
    private NbdServerAddress? _address;
    private CancellationTokenSource? _stopping;
    private Task? _acceptLoop;
    private SemaphoreSlim? _connectionSlots;
    private TlsServerPolicy? _tls;
    private int _maxConnections;
    private TimeSpan _handshakeLimit = TimeSpan.FromSeconds(DefaultHandshakeMaxSeconds);
    private long _clientCounter;

    /// <param name="graph">Where export node names are looked up.</param>
    /// <param name="events">Receives BLOCK_EXPORT_DELETED.</param>
    /// <param name="logger">Connection and request failures.</param>
    /// <param name="bitmapProvider">Resolves <c>bitmaps</c> of block-export-add into <c>qemu:dirty-bitmap:NAME</c>
    /// contexts; null for <see cref="DirtyBitmapContextProvider"/> (the block layer's named dirty bitmaps).</param>
    public NbdServer(BlockGraph graph, IEventSink events, ILogger<NbdServer>? logger = null, IMetaContextProvider? bitmapProvider = null)
        : this(graph, () => events, logger, bitmapProvider)
    {
        ArgumentNullException.ThrowIfNull(events);
    }

    /// <summary>
    /// For the host: the event sink (the QMP server) depends on the command modules, which depend on this
    /// server, so the sink is resolved only when the first event is emitted.
    /// </summary>
    public NbdServer(BlockGraph graph, Func<IEventSink> events, ILogger<NbdServer>? logger = null, IMetaContextProvider? bitmapProvider = null)
    {
        ArgumentNullException.ThrowIfNull(graph);
        ArgumentNullException.ThrowIfNull(events);
        _graph = graph;
        _events = events;
        _bitmaps = bitmapProvider ?? new DirtyBitmapContextProvider(graph);
        _logger = (ILogger?)logger ?? NullLogger.Instance;
    }

    /// <summary>File descriptors shared by every client connection of the process (QMP and NBD).</summary>
    public ConnectionBudget ConnectionBudget { get; init; } = ConnectionBudget.Process;

    /// <summary>Where tls-creds and tls-authz ids are looked up (the daemon's objects).</summary>
    public ObjectRegistry Objects { get; init; } = new();

    public bool IsRunning
    {
        get
        {
            lock (_lock)
            {
                return _listener is not null;
            }
        }
    }

    /// <summary>The bound address (useful with TCP port 0); null when not running.</summary>
    public EndPoint? LocalEndPoint
    {
        get
        {
            lock (_lock)
            {
                return _listener?.LocalEndPoint;
            }
        }
    }

    // ------------------------------------------------------------------ start / stop

    /// <summary>
    /// nbd-server-start: binds <paramref name="address"/> and starts accepting clients. Throws
    /// <see cref="BlockException"/> with QEMU's wording when already running or when binding fails.
    /// </summary>
    /// <param name="maxConnections">0 for unlimited; 1 also stops advertising CAN_MULTI_CONN.</param>
    /// <param name="tlsCreds">Id of server TLS credentials: clients must then start TLS before anything else.</param>
    /// <param name="tlsAuthz">Id of an authz object checked against each client certificate's name; ignored without <paramref name="tlsCreds"/>, as in QEMU.</param>
    /// <param name="handshakeMaxSeconds">Time a client has to finish negotiating before it is dropped; 0 for no limit (QEMU's handshake-max-seconds).</param>
    public void Start(NbdServerAddress address, uint maxConnections = 0, string? tlsCreds = null, string? tlsAuthz = null,
        uint handshakeMaxSeconds = DefaultHandshakeMaxSeconds)
    {
        ArgumentNullException.ThrowIfNull(address);
        lock (_lock)
        {
            if (_listener is not null)
            {
                throw new BlockException("NBD server already running");
            }
        }
        // QEMU's order: bind, then look the credentials up. The server keeps the credentials it was given
        // even if the object is deleted; the authz object is looked up by id at each handshake.
        var listener = Bind(address);
        AcceptBackoff.StartRuntimeTimerThread();
        TlsServerPolicy? tls = null;
        if (tlsCreds is not null)
        {
            try
            {
                tls = new TlsServerPolicy(TlsCredentials.Find(Objects, tlsCreds, TlsEndpoint.Server), tlsAuthz, Objects);
            }
            catch (BlockException)
            {
                CloseListener(listener, address);
                throw;
            }
        }
        lock (_lock)
        {
            _listener = listener;
            _address = address;
            _tls = tls;
            _stopping = new CancellationTokenSource();
            _maxConnections = (int)Math.Min(maxConnections, int.MaxValue);
            _handshakeLimit = handshakeMaxSeconds == 0 ? Timeout.InfiniteTimeSpan : TimeSpan.FromSeconds(handshakeMaxSeconds);
            _connectionSlots = _maxConnections > 0 ? new SemaphoreSlim(_maxConnections, _maxConnections) : null;
            _acceptLoop = AcceptLoopAsync(listener, _connectionSlots, _stopping.Token);
        }
        _logger.LogInformation("NBD server listening on {Address}{Tls}", Describe(address), tls is null ? "" : " (TLS required)");
    }

    /// <summary>
    /// nbd-server-stop (and daemon shutdown): removes every export, drops every connection, stops
    /// listening and removes the socket file. Does nothing when not running.
    /// </summary>
    public async ValueTask StopAsync()
    {
        Socket? listener;
        NbdServerAddress? address;
        CancellationTokenSource? stopping;
        Task? acceptLoop;
        SemaphoreSlim? slots;
        List<NbdExport> exports;
        lock (_lock)
        {
            listener = _listener;
            address = _address;
            stopping = _stopping;
            acceptLoop = _acceptLoop;
            slots = _connectionSlots;
            exports = [.. _exports];
            _listener = null;
            _address = null;
            _stopping = null;
            _acceptLoop = null;
            _connectionSlots = null;
        }
        if (listener is null)
        {
            return;
        }
        foreach (var e in exports)
        {
            await RemoveExportCoreAsync(e).ConfigureAwait(false);
        }
        await stopping!.CancelAsync().ConfigureAwait(false);
        CloseListener(listener, address!);
        await acceptLoop!.ConfigureAwait(false);
        List<NbdConnection> connections;
        lock (_lock)
        {
            connections = [.. _connections];
        }
        foreach (var c in connections)
        {
            c.Abort();
        }
        await Task.WhenAll(connections.Select(c => c.Completion)).ConfigureAwait(false);
        stopping.Dispose();
        slots?.Dispose();
        _logger.LogInformation("NBD server stopped");
    }

    public ValueTask DisposeAsync() => StopAsync();

    /// <summary>
    /// Closes every export in the order they were added, each emitting BLOCK_EXPORT_DELETED, and leaves
    /// the server listening (QSD's quit and SIGTERM: exports go before the monitors do).
    /// </summary>
    public async ValueTask RemoveAllExportsAsync()
    {
        List<NbdExport> exports;
        lock (_lock)
        {
            exports = [.. _exports];
        }
        foreach (var e in exports)
        {
            await RemoveExportCoreAsync(e).ConfigureAwait(false);
        }
    }

    private static Socket Bind(NbdServerAddress address)
    {
        switch (address)
        {
            case NbdUnixAddress unix:
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    if (!unix.Abstract && File.Exists(unix.Path))
                    {
                        // QEMU removes a stale socket file before binding; so do we.
                        File.Delete(unix.Path);
                    }
                    socket.Bind(new UnixDomainSocketEndPoint(unix.Abstract ? "\0" + unix.Path : unix.Path));
                    if (!unix.Abstract)
                    {
                        SocketFiles.RestrictToOwner(unix.Path);
                    }
                    socket.Listen(128);
                    return socket;
                }
                catch (Exception e) when (e is SocketException or IOException or UnauthorizedAccessException)
                {
                    socket.Dispose();
                    var reason = e is SocketException se ? UnixBindError(se, unix.Path) : e.Message;
                    throw new BlockException($"Failed to bind socket to {unix.Path}: {reason}");
                }
            }
            case NbdInetAddress inet:
            {
                IPAddress[] candidates;
                try
                {
                    candidates = IPAddress.TryParse(inet.Host, out var literal) ? [literal]
                        : inet.Host.Length == 0 ? [IPAddress.IPv6Any, IPAddress.Any]
                        : Dns.GetHostAddresses(inet.Host);
                }
                catch (SocketException e)
                {
                    throw new BlockException($"address resolution failed for {inet.Host}:{inet.Port}: {e.Message}");
                }
                if (!ushort.TryParse(inet.Port, out var port))
                {
                    throw new BlockException($"address resolution failed for {inet.Host}:{inet.Port}: Servname not supported for ai_socktype");
                }
                candidates = candidates.Where(a =>
                    a.AddressFamily == AddressFamily.InterNetwork ? inet.Ipv4 != false : inet.Ipv6 != false).ToArray();
                SocketException? last = null;
                foreach (var a in candidates)
                {
                    var socket = new Socket(a.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
                    try
                    {
                        socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
                        socket.NoDelay = true;
                        socket.Bind(new IPEndPoint(a, port));
                        socket.Listen(128);
                        return socket;
                    }
                    catch (SocketException e)
                    {
                        socket.Dispose();
                        last = e;
                    }
                }
                throw new BlockException($"Failed to bind socket: {last?.Message ?? "Address family not supported"}");
            }
            case NbdFdAddress fd:
                return AdoptListener(fd.Str);
            default:
                throw new BlockException("unsupported socket address");
        }
    }

    /// <summary>
    /// A descriptor the parent passed: QEMU's texts for a number it cannot parse and for one that is not
    /// a socket (also when nothing is open under it); listen() is called on it as QEMU does.
    /// </summary>
    private static Socket AdoptListener(string str)
    {
        if (!int.TryParse(str, System.Globalization.NumberStyles.AllowLeadingSign, System.Globalization.CultureInfo.InvariantCulture, out var fd))
        {
            throw new BlockException($"Unable to parse FD number {str}");
        }
        Socket? socket = null;
        try
        {
            socket = new Socket(new SafeSocketHandle(fd, ownsHandle: true));
            // The constructor does not look at the descriptor; SO_TYPE fails for a file or a closed number.
            _ = socket.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.Type);
        }
        catch (SocketException)
        {
            socket?.Dispose();
            throw new BlockException($"File descriptor '{fd}' is not a socket");
        }
        try
        {
            socket.Listen(128);
            return socket;
        }
        catch (SocketException e)
        {
            socket.Dispose();
            throw new BlockException($"Failed to listen on fd socket: {e.Message}");
        }
    }

    private static string UnixBindError(SocketException e, string path)
    {
        var dir = Path.GetDirectoryName(Path.GetFullPath(path));
        if (dir is not null && !Directory.Exists(dir))
        {
            return "No such file or directory";
        }
        return e.SocketErrorCode switch
        {
            SocketError.AddressAlreadyInUse => "Address already in use",
            SocketError.AccessDenied => "Permission denied",
            _ => e.Message,
        };
    }

    private static void CloseListener(Socket listener, NbdServerAddress address)
    {
        // QEMU removes the socket file of a Unix listener, an inherited one's included.
        var path = address switch
        {
            NbdUnixAddress { Abstract: false } unix => unix.Path,
            NbdFdAddress => BoundPath(listener),
            _ => null,
        };
        listener.Dispose();
        if (path is not null)
        {
            try
            {
                File.Delete(path);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Nothing more to do; the file is harmless and the next start removes it.
            }
        }
    }

    /// <summary>The file a Unix listener is bound to; null for TCP, abstract or unnamed sockets.</summary>
    private static string? BoundPath(Socket socket)
    {
        try
        {
            return socket.LocalEndPoint is UnixDomainSocketEndPoint u && u.ToString() is { Length: > 0 } p && p[0] is not ('\0' or '@')
                ? p
                : null;
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            return null;
        }
    }

    private static string Describe(NbdServerAddress address) => address switch
    {
        NbdUnixAddress u => "unix:" + u.Path,
        NbdInetAddress i => $"{i.Host}:{i.Port}",
        NbdFdAddress f => "fd:" + f.Str,
        _ => address.ToString()!,
    };

    private async Task AcceptLoopAsync(Socket listener, SemaphoreSlim? slots, CancellationToken cancellationToken)
    {
        await Task.Yield();
        var backoff = new AcceptBackoff();
        while (!cancellationToken.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                if (slots is not null)
                {
                    // At max-connections, stop accepting: new clients wait in the backlog, as with QEMU.
                    await slots.WaitAsync(cancellationToken).ConfigureAwait(false);
                }
                try
                {
                    await ConnectionBudget.TakeAsync(cancellationToken).ConfigureAwait(false);
                }
                catch
                {
                    slots?.Release();
                    throw;
                }
                socket = await listener.AcceptAsync(cancellationToken).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException)
            {
                return;
            }
            catch (SocketException e)
            {
                ConnectionBudget.Release();
                slots?.Release();
                if (cancellationToken.IsCancellationRequested)
                {
                    return;
                }
                if (AcceptBackoff.IsPeerGone(e))
                {
                    continue;
                }
                // Out of fds the pending client stays in the backlog and the listener stays readable: retrying
                // at once would spin (see AcceptBackoff). Wait, longer each time, and never give up.
                var delay = backoff.Failed();
                if (backoff.Failures == 1)
                {
                    _logger.LogWarning("NBD server: accept failed: {Error}; retrying with a growing delay", AcceptBackoff.Describe(e));
                }
                try
                {
                    await Task.Delay(delay, cancellationToken).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    return;
                }
                continue;
            }
            if (backoff.Succeeded() is var streak and > 0)
            {
                _logger.LogInformation("NBD server: accept works again after {Failures} failures", streak);
            }
            if (socket.AddressFamily is AddressFamily.InterNetwork or AddressFamily.InterNetworkV6)
            {
                socket.NoDelay = true;
            }
            var client = socket.RemoteEndPoint is IPEndPoint ip ? ip.ToString() : $"unix#{Interlocked.Increment(ref _clientCounter)}";
            TlsServerPolicy? tls;
            TimeSpan handshakeLimit;
            lock (_lock)
            {
                tls = _tls;
                handshakeLimit = _handshakeLimit;
            }
            var connection = new NbdConnection(socket, this, _logger, client, tls, handshakeLimit);
            lock (_lock)
            {
                _connections.Add(connection);
            }
            _ = RunConnectionAsync(connection, slots);
        }
    }

    private async Task RunConnectionAsync(NbdConnection connection, SemaphoreSlim? slots)
    {
        try
        {
            await connection.RunAsync().ConfigureAwait(false);
        }
        finally
        {
            lock (_lock)
            {
                _connections.Remove(connection);
            }
            ConnectionBudget.Release();
            try
            {
                slots?.Release();
            }
            catch (ObjectDisposedException)
            {
                // The server stopped meanwhile.
            }
        }
    }

    // ------------------------------------------------------------------ exports

    /// <summary>Exports in the order query-block-exports lists them (newest first, as QEMU does).</summary>
    public IReadOnlyList<NbdExport> Exports
    {
        get
        {
            lock (_lock)
            {
                var list = _exports.ToList();
                list.Reverse();
                return list;
            }
        }
    }

    public NbdExport? FindById(string id)
    {
        lock (_lock)
        {
            return _exports.FirstOrDefault(e => e.Id == id);
        }
    }

    NbdExport? INbdExportDirectory.FindByName(string name)
    {
        lock (_lock)
        {
            return _exports.FirstOrDefault(e => e.Name == name && !e.ShuttingDown);
        }
    }

    IReadOnlyList<NbdExport> INbdExportDirectory.ListExports()
    {
        lock (_lock)
        {
            return _exports.Where(e => !e.ShuttingDown).ToList();
        }
    }

    /// <summary>
    /// block-export-add (type nbd) and nbd-server-add: checks everything in QEMU's order with QEMU's
    /// wording, then creates the export. Nothing changes unless every check passes.
    /// </summary>
    public NbdExport AddExport(NbdExportOptions options, string? iothread = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (!Identifier.IsWellFormed(options.Id))
        {
            throw new BlockException("Invalid block export id");
        }
        if (FindById(options.Id) is not null)
        {
            throw new BlockException($"Block export id '{options.Id}' is already in use");
        }
        var node = _graph.Find(options.NodeName) ?? throw new BlockException(options.LegacyDeviceLookup
            ? $"Cannot find device='{options.NodeName}' nor node-name='{options.NodeName}'"
            : $"Cannot find device='' nor node-name='{options.NodeName}'");
        if (iothread is not null)
        {
            throw new BlockException($"iothread \"{iothread}\" not found");
        }
        if (options.Writable && node.ReadOnly)
        {
            throw new BlockException("Cannot export read-only node as writable");
        }
        if (!IsRunning)
        {
            throw new BlockException("NBD server not running");
        }
        var name = options.Name ?? options.NodeName;
        if (Encoding.UTF8.GetByteCount(name) > NbdWire.NBD_MAX_STRING_SIZE)
        {
            throw new BlockException($"export name '{name}' too long");
        }
        if (options.Description is { } d && Encoding.UTF8.GetByteCount(d) > NbdWire.NBD_MAX_STRING_SIZE)
        {
            throw new BlockException($"description '{d}' too long");
        }
        if (((INbdExportDirectory)this).FindByName(name) is not null)
        {
            throw new BlockException($"NBD server already has export named '{name}'");
        }

        // What the export's device takes and shares on the node (QEMU: before the bitmaps are looked at);
        // fails with QEMU's permission conflict or image lock error.
        var permissions = _graph.AttachUser(node, ExternalUse.NbdExport(options.Writable));
        var contexts = new List<IExportMetaContext> { new BaseAllocationContext(node) };
        if (options.AllocationDepth)
        {
            contexts.Add(new AllocationDepthContext(node));
        }
        try
        {
            foreach (var b in options.Bitmaps)
            {
                var context = _bitmaps.OpenBitmap(node, b, options.Writable);
                if (contexts.Any(c => c.Name == context.Name))
                {
                    (context as IDisposable)?.Dispose();
                    throw new BlockException($"Bitmap '{b.Name}' is already exported");
                }
                contexts.Add(context);
            }
        }
        catch
        {
            foreach (var c in contexts)
            {
                (c as IDisposable)?.Dispose();
            }
            permissions.Dispose();
            throw;
        }

        // blockdev-del of the node now fails ("Node x is in use", as QSD: the graph sees the export's use).
        var user = new ExportUse(node.AddUser($"block device is in use by export '{options.Id}'"), permissions);
        var export = new NbdExport(options, name, node, contexts, user, _maxConnections);
        lock (_lock)
        {
            _exports.Add(export);
        }
        _logger.LogInformation("NBD export '{Export}' of node '{NodeName}' added as '{Name}'", options.Id, node.NodeName, name);
        return export;
    }

    /// <summary>
    /// block-export-del / nbd-server-remove. <paramref name="hard"/> drops connected clients; otherwise an
    /// export with clients stays and this fails. Emits BLOCK_EXPORT_DELETED once the export is gone.
    /// </summary>
    public async ValueTask RemoveExportAsync(string id, bool hard)
    {
        var export = FindById(id) ?? throw new BlockException($"Export '{id}' is not found");
        if (export.ShuttingDown)
        {
            throw new BlockException($"Export '{id}' is already shutting down");
        }
        // Clients that have gone but whose connections have not wound down yet are dropped like hard mode's.
        if (!hard && export.LiveConnectionCount > 0)
        {
            throw new BlockException($"export '{id}' still in use");
        }
        await RemoveExportCoreAsync(export).ConfigureAwait(false);
    }

    private async ValueTask RemoveExportCoreAsync(NbdExport export)
    {
        if (!export.BeginShutdown(out var connections))
        {
            return;
        }
        foreach (var c in connections)
        {
            c.Abort();
        }
        await Task.WhenAll(connections.Select(c => c.Completion)).ConfigureAwait(false);
        export.Release();
        lock (_lock)
        {
            _exports.Remove(export);
        }
        _logger.LogInformation("NBD export '{Export}' removed", export.Id);
        _events().Emit("BLOCK_EXPORT_DELETED", [new("id", export.Id)]);
    }


    /// <summary>An export's hold on its node: the busy reason blockdev-del reports and its permissions.</summary>
    private sealed class ExportUse(IDisposable busy, IDisposable permissions) : IDisposable
    {
        public void Dispose()
        {
            busy.Dispose();
            permissions.Dispose();
        }
    }
}
