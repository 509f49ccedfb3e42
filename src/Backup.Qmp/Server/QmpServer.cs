using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Posix;
using Backup.Block.Security;
using Backup.Qmp.Session;
using Microsoft.Extensions.Logging;

namespace Backup.Qmp.Server;

/// <summary>
/// Where a QMP monitor is served: a listener (a socket this daemon binds, or a listening socket it
/// inherited as a file descriptor) that accepts any number of clients, or one connection (one this
/// daemon makes, QEMU's client-mode chardev, or a connected socket it inherited).
/// </summary>
public abstract record QmpEndpoint
{
    /// <summary>True for the kinds that are one connection rather than a listener.</summary>
    public virtual bool IsConnection => false;

    public sealed record Unix(string Path) : QmpEndpoint
    {
        public override string ToString() => "unix:" + Path;
    }

    public sealed record Tcp(string Host, int Port) : QmpEndpoint
    {
        public override string ToString() => $"tcp:{Host}:{Port}";
    }

    /// <summary>A socket passed by the parent process (<c>fd=N,server=on</c>); listened on if it is not yet.</summary>
    public sealed record InheritedListener(int Fd) : QmpEndpoint
    {
        public override string ToString() => $"fd:{Fd}";
    }

    /// <summary>A connected socket passed by the parent (<c>fd=N</c> without server, e.g. one end of a socketpair).</summary>
    public sealed record InheritedConnection(int Fd) : QmpEndpoint
    {
        public override bool IsConnection => true;

        public override string ToString() => $"fd:{Fd}";
    }

    /// <summary>A Unix socket this daemon connects to (<c>path=P</c> without server): the client listens, as iotests' harness does.</summary>
    public sealed record UnixConnect(string Path) : QmpEndpoint
    {
        public override bool IsConnection => true;

        public override string ToString() => "unix:" + Path;
    }

    /// <summary>A TCP address this daemon connects to (<c>host=H,port=P</c> without server).</summary>
    public sealed record TcpConnect(string Host, int Port) : QmpEndpoint
    {
        public override bool IsConnection => true;

        public override string ToString() => $"{Host}:{Port}";
    }
}

/// <summary>A QMP endpoint could not be opened; the message is QEMU's text for it.</summary>
public sealed class QmpEndpointException(string message) : Exception(message)
{
    public QmpEndpointException() : this("cannot open the QMP endpoint") { }

    public QmpEndpointException(string message, Exception inner) : this(message + ": " + inner.Message) { }
}

/// <summary>
/// Accepts QMP clients on any number of Unix and TCP listeners, runs a session for each, and
/// broadcasts events to every negotiated session. Stopping closes the listeners, ends the sessions
/// and removes the Unix socket files.
/// </summary>
public sealed class QmpServer : IEventSink, IAsyncDisposable
{
    private readonly QmpDispatcher _dispatcher;
    private readonly ILogger _logger;
    private readonly VersionInfo _version;
    private readonly List<(Socket Socket, QmpEndpoint Endpoint)> _listeners = [];
    private readonly Lock _sessionsLock = new();
    private readonly HashSet<QmpSession> _sessions = [];
    private readonly List<Task> _tasks = [];
    private readonly CancellationTokenSource _stopping = new();

    /// <summary>
    /// Sessions one listener serves at once (QSD serves one per monitor). Beyond it, new clients wait in the
    /// listen backlog until a session ends, so a flood of connections cannot take every file descriptor
    /// the daemon has for exports, images and other listeners. Documented in docs/reliability.md.
    /// </summary>
    public const int DefaultMaxSessionsPerListener = 128;

    /// <summary>How long a TLS client may take to shake hands before its connection is dropped (it holds a session slot meanwhile).</summary>
    public static readonly TimeSpan TlsHandshakeTimeout = TimeSpan.FromSeconds(10);

    /// <summary>The highest session limit accepted (each session holds a descriptor and buffers).</summary>
    public const int MaxSessionsLimit = 65536;

    public QmpServer(QmpDispatcher dispatcher, VersionInfo version, ILogger logger)
    {
        _dispatcher = dispatcher;
        _version = version;
        _logger = logger;
    }

    /// <summary>The listening endpoints, with TCP port 0 resolved to the port actually bound.</summary>
    public IReadOnlyList<QmpEndpoint> Endpoints => _listeners.Select(l => l.Endpoint).ToList();

    /// <summary>Set before the first <see cref="Listen"/>; applies to each listener on its own.</summary>
    public int MaxSessionsPerListener { get; init; } = DefaultMaxSessionsPerListener;

    /// <summary>File descriptors shared by every client connection of the process (QMP and NBD).</summary>
    public ConnectionBudget ConnectionBudget { get; init; } = ConnectionBudget.Process;

    public int SessionCount
    {
        get
        {
            lock (_sessionsLock)
            {
                return _sessions.Count;
            }
        }
    }

    /// <summary>
    /// Opens an endpoint now, so that errors surface before the daemon reports itself ready: binds (or
    /// adopts) a listener and starts accepting, or makes (or adopts) the one connection and starts its
    /// session. Throws <see cref="QmpEndpointException"/> with QEMU's text. Returns the endpoint with
    /// TCP port 0 resolved to the port actually bound.
    /// </summary>
    /// <param name="endpoint">Where.</param>
    /// <param name="firstClient">Completed when the first client of this endpoint has connected
    /// (at once for a connection); QEMU's <c>wait=on</c> holds start-up on it.</param>
    /// <param name="tls">QEMU's chardev tls-creds/tls-authz: each connection is TLS (a listener's as the
    /// server, a connection the daemon makes as the client), set up before the greeting.</param>
    public QmpEndpoint Open(QmpEndpoint endpoint, out Task firstClient, TlsServerPolicy? tls = null)
    {
        ArgumentNullException.ThrowIfNull(endpoint);
        if (endpoint.IsConnection)
        {
            var connection = Connect(endpoint);
            var host = endpoint is QmpEndpoint.TcpConnect tc ? tc.Host : null;
            _tasks.Add(RunSessionAsync(connection, endpoint.ToString(), slot: null, tls, tlsHostname: host));
            _logger.LogInformation("QMP monitor on connection {Endpoint}", endpoint);
            firstClient = Task.CompletedTask;
            return endpoint;
        }
        Socket socket;
        switch (endpoint)
        {
            case QmpEndpoint.Unix u:
                if (File.Exists(u.Path))
                {
                    // A stale socket from a killed daemon; QEMU unlinks it too.
                    File.Delete(u.Path);
                }
                socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                Bind(socket, new UnixDomainSocketEndPoint(u.Path), u.Path);
                SocketFiles.RestrictToOwner(u.Path);
                break;
            case QmpEndpoint.Tcp t:
                var address = t.Host is "" or "0.0.0.0" ? IPAddress.Any
                    : IPAddress.TryParse(t.Host, out var ip) ? ip
                    : Dns.GetHostAddresses(t.Host).First();
                socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
                socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
                Bind(socket, new IPEndPoint(address, t.Port), $"{t.Host}:{t.Port}");
                endpoint = t with { Port = ((IPEndPoint)socket.LocalEndPoint!).Port };
                break;
            case QmpEndpoint.InheritedListener f:
                socket = AdoptSocket(f.Fd);
                break;
            default:
                throw new ArgumentException("unknown endpoint", nameof(endpoint));
        }
        try
        {
            // QEMU calls listen() on an inherited socket too: a bound one starts listening, a connected
            // one (a socketpair) fails with EINVAL.
            socket.Listen(128);
        }
        catch (SocketException e)
        {
            socket.Dispose();
            throw new QmpEndpointException(endpoint is QmpEndpoint.InheritedListener
                ? $"Failed to listen on fd socket: {e.Message}"
                : $"Failed to listen on socket: {e.Message}");
        }
        var first = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        firstClient = first.Task;
        AcceptBackoff.StartRuntimeTimerThread();
        _listeners.Add((socket, endpoint));
        _tasks.Add(AcceptLoopAsync(socket, endpoint, first, tls));
        _logger.LogInformation("QMP listening on {Endpoint}{Tls}", endpoint, tls is null ? "" : " (TLS)");
        return endpoint;
    }

    private static void Bind(Socket socket, EndPoint address, string shown)
    {
        try
        {
            socket.Bind(address);
        }
        catch (SocketException e)
        {
            socket.Dispose();
            throw new QmpEndpointException($"Failed to bind socket to {shown}: {e.Message}");
        }
    }

    /// <summary>
    /// A socket the parent process passed as a file descriptor. QEMU says the same for a number that
    /// is no open descriptor as for one that is not a socket.
    /// </summary>
    private static Socket AdoptSocket(int fd)
    {
        Socket? socket = null;
        try
        {
            socket = new Socket(new SafeSocketHandle(fd, ownsHandle: true));
            // The constructor does not look at the descriptor; SO_TYPE fails for a file or a closed number.
            _ = socket.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.Type);
            return socket;
        }
        catch (SocketException)
        {
            socket?.Dispose();
            throw new QmpEndpointException($"File descriptor '{fd}' is not a socket");
        }
    }

    private static Socket Connect(QmpEndpoint endpoint)
    {
        switch (endpoint)
        {
            case QmpEndpoint.InheritedConnection f:
                return AdoptSocket(f.Fd);
            case QmpEndpoint.UnixConnect u:
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    socket.Connect(new UnixDomainSocketEndPoint(u.Path));
                    return socket;
                }
                catch (SocketException e)
                {
                    socket.Dispose();
                    throw new QmpEndpointException($"Failed to connect to '{u.Path}': {ConnectError(e)}");
                }
            }
            case QmpEndpoint.TcpConnect t:
            {
                var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
                try
                {
                    socket.Connect(t.Host, t.Port);
                    socket.NoDelay = true;
                    return socket;
                }
                catch (SocketException e)
                {
                    socket.Dispose();
                    throw new QmpEndpointException($"Failed to connect to '{t.Host}:{t.Port}': {ConnectError(e)}");
                }
            }
            default:
                throw new ArgumentException("unknown endpoint", nameof(endpoint));
        }
    }

    /// <summary>
    /// strerror's words for the usual connect failures: .NET reports a missing Unix socket file (ENOENT)
    /// as AddressNotAvailable and appends the path to its texts.
    /// </summary>
    private static string ConnectError(SocketException e) => e.SocketErrorCode switch
    {
        SocketError.AddressNotAvailable => "No such file or directory",
        SocketError.ConnectionRefused => "Connection refused",
        SocketError.AccessDenied => "Permission denied",
        SocketError.HostNotFound => "Name or service not known",
        _ => e.Message,
    };

    private async Task AcceptLoopAsync(Socket listener, QmpEndpoint endpoint, TaskCompletionSource firstClient, TlsServerPolicy? tls)
    {
        var ct = _stopping.Token;
        var backoff = new AcceptBackoff();
        using var slots = new SemaphoreSlim(MaxSessionsPerListener, MaxSessionsPerListener);
        var sessions = new List<Task>();
        while (!ct.IsCancellationRequested)
        {
            Socket client;
            try
            {
                // At the limit, stop accepting: new clients wait in the backlog until a session ends.
                await slots.WaitAsync(ct).ConfigureAwait(false);
                try
                {
                    await ConnectionBudget.TakeAsync(ct).ConfigureAwait(false);
                }
                catch
                {
                    slots.Release();
                    throw;
                }
                try
                {
                    client = await listener.AcceptAsync(ct).ConfigureAwait(false);
                }
                catch
                {
                    ConnectionBudget.Release();
                    slots.Release();
                    throw;
                }
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException)
            {
                break;
            }
            catch (SocketException e)
            {
                if (ct.IsCancellationRequested)
                {
                    break;
                }
                if (AcceptBackoff.IsPeerGone(e))
                {
                    continue;
                }
                // Never give up on the listener: out of fds now does not mean out of fds forever.
                var delay = backoff.Failed();
                if (backoff.Failures == 1)
                {
                    _logger.LogWarning("QMP accept on {Endpoint} failed: {Error}; retrying with a growing delay", endpoint, AcceptBackoff.Describe(e));
                }
                try
                {
                    await Task.Delay(delay, ct).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    break;
                }
                continue;
            }
            if (backoff.Succeeded() is var streak and > 0)
            {
                _logger.LogInformation("QMP accept on {Endpoint} works again after {Failures} failures", endpoint, streak);
            }
            if (client.AddressFamily != AddressFamily.Unix)
            {
                client.NoDelay = true;
            }
            var peer = client.RemoteEndPoint?.ToString() is { Length: > 0 } r ? r : endpoint.ToString();
            sessions.RemoveAll(t => t.IsCompleted);
            sessions.Add(RunSessionAsync(client, peer, slots, tls, tlsHostname: null));
            firstClient.TrySetResult();
        }
        firstClient.TrySetCanceled(CancellationToken.None);
        // The slots outlive no session: wait for them before the semaphore is disposed.
        await Task.WhenAll(sessions).ConfigureAwait(false);
    }

    /// <param name="slot">The listener's session slot and a connection-budget share, given back at the end; null for a monitor connection the daemon made itself.</param>
    /// <param name="tls">TLS for this connection: as the server when <paramref name="slot"/> is a listener's, else as the client.</param>
    /// <param name="tlsHostname">The name the server's certificate must carry, for a connection the daemon made.</param>
    private async Task RunSessionAsync(Socket client, string peer, SemaphoreSlim? slot, TlsServerPolicy? tls, string? tlsHostname)
    {
        try
        {
            await using var network = new NetworkStream(client, ownsSocket: true);
            var stream = tls is null ? network : await StartTlsAsync(network, peer, tls, asServer: slot is not null, tlsHostname).ConfigureAwait(false);
            if (stream is null)
            {
                return;
            }
            await using (stream.ConfigureAwait(false))
            {
                await RunSessionAsync(stream, peer).ConfigureAwait(false);
            }
        }
        finally
        {
            if (slot is not null)
            {
                ConnectionBudget.Release();
                slot.Release();
            }
        }
    }

    /// <summary>The TLS session over <paramref name="network"/>, or null when the handshake failed or the client was refused (logged, as QEMU reports it).</summary>
    private async Task<Stream?> StartTlsAsync(NetworkStream network, string peer, TlsServerPolicy tls, bool asServer, string? hostname)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token);
        timeout.CancelAfter(TlsHandshakeTimeout);
        try
        {
            return asServer
                ? await TlsChannel.AcceptAsync(network, tls, timeout.Token).ConfigureAwait(false)
                : await TlsChannel.ConnectAsync(network, tls.Credentials, hostname, timeout.Token).ConfigureAwait(false);
        }
        catch (TlsException e)
        {
            _logger.LogWarning("QMP {Client}: TLS: {Reason}", peer, e.Message);
        }
        catch (OperationCanceledException)
        {
            _logger.LogWarning("QMP {Client}: TLS handshake not finished within {Seconds} s", peer, TlsHandshakeTimeout.TotalSeconds);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
        {
            _logger.LogDebug("QMP {Client}: connection ended during the TLS handshake: {Error}", peer, e.Message);
        }
#pragma warning disable CA1031 // one client's failed handshake must not end the listener
        catch (Exception e)
#pragma warning restore CA1031
        {
            _logger.LogError(e, "QMP {Client}: TLS handshake failed", peer);
        }
        return null;
    }

    private async Task RunSessionAsync(Stream stream, string peer)
    {
        using var session = new QmpSession(stream, _dispatcher, _logger, peer);
        lock (_sessionsLock)
        {
            _sessions.Add(session);
        }
        _logger.LogDebug("QMP {Client}: connected", peer);
        try
        {
            await session.RunAsync(Greeting(), _stopping.Token).ConfigureAwait(false);
        }
        catch (Exception e)
        {
            _logger.LogError(e, "QMP {Client}: session ended with an error", peer);
        }
        finally
        {
            lock (_sessionsLock)
            {
                _sessions.Remove(session);
            }
            _logger.LogDebug("QMP {Client}: disconnected", peer);
        }
    }

    private JsonObject Greeting() => new()
    {
        ["QMP"] = new JsonObject
        {
            ["version"] = _version.ToJson(),
            ["capabilities"] = new JsonArray("oob"),
        },
    };

    public void Emit(string name, IReadOnlyList<KeyValuePair<string, object?>> data)
    {
        ArgumentNullException.ThrowIfNull(data);
        if (!_dispatcher.Schema.Events.ContainsKey(name))
        {
            // Every event a client can see is declared in schemas/; an undeclared one is a bug to fix there.
            _logger.LogError("event {Event} is not declared in the schema", name);
        }
        var now = DateTimeOffset.UtcNow;
        var micros = (now - DateTimeOffset.UnixEpoch).Ticks / 10;
        var message = new JsonObject { ["event"] = name };
        if (data.Count > 0)
        {
            message["data"] = JsonValues.From(data);
        }
        message["timestamp"] = new JsonObject { ["seconds"] = micros / 1_000_000, ["microseconds"] = micros % 1_000_000 };
        var bytes = QmpSession.Serialize(message);
        QmpSession[] sessions;
        lock (_sessionsLock)
        {
            sessions = [.. _sessions];
        }
        foreach (var s in sessions)
        {
            s.SendEvent(bytes);
        }
    }

    /// <summary>Stops listening, ends every session and removes Unix socket files.</summary>
    public async ValueTask StopAsync()
    {
        if (_stopping.IsCancellationRequested)
        {
            return;
        }
        await _stopping.CancelAsync().ConfigureAwait(false);
        foreach (var (socket, endpoint) in _listeners)
        {
            // QEMU removes the socket file of a Unix listener at exit, an inherited one's included.
            var path = endpoint switch
            {
                QmpEndpoint.Unix u => u.Path,
                QmpEndpoint.InheritedListener => ListeningPath(socket),
                _ => null,
            };
            socket.Dispose();
            if (path is not null)
            {
                try
                {
                    File.Delete(path);
                }
                catch (IOException e)
                {
                    _logger.LogWarning("could not remove {Path}: {Error}", path, e.Message);
                }
            }
        }
        QmpSession[] sessions;
        lock (_sessionsLock)
        {
            sessions = [.. _sessions];
        }
        foreach (var s in sessions)
        {
            s.Close();
        }
        await Task.WhenAll(_tasks).ConfigureAwait(false);
    }

    /// <summary>The file a Unix listener is bound to; null for TCP, abstract or unnamed sockets.</summary>
    private static string? ListeningPath(Socket socket)
    {
        try
        {
            return socket.LocalEndPoint is UnixDomainSocketEndPoint u && u.ToString() is { Length: > 0 } p && p[0] is not ('\0' or '@')
                ? p
                : null;
        }
        catch (SocketException)
        {
            return null;
        }
    }

    public async ValueTask DisposeAsync()
    {
        await StopAsync().ConfigureAwait(false);
        _stopping.Dispose();
    }
}
