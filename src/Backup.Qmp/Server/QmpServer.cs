using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Posix;
using Backup.Qmp.Session;
using Microsoft.Extensions.Logging;

namespace Backup.Qmp.Server;

/// <summary>Where a QMP listener listens.</summary>
public abstract record QmpEndpoint
{
    public sealed record Unix(string Path) : QmpEndpoint
    {
        public override string ToString() => "unix:" + Path;
    }

    public sealed record Tcp(string Host, int Port) : QmpEndpoint
    {
        public override string ToString() => $"tcp:{Host}:{Port}";
    }
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

    /// <summary>Binds a listener now (so that errors surface before the daemon reports itself ready) and starts accepting.</summary>
    public QmpEndpoint Listen(QmpEndpoint endpoint)
    {
        ArgumentNullException.ThrowIfNull(endpoint);
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
                socket.Bind(new UnixDomainSocketEndPoint(u.Path));
                break;
            case QmpEndpoint.Tcp t:
                var address = t.Host is "" or "0.0.0.0" ? IPAddress.Any
                    : IPAddress.TryParse(t.Host, out var ip) ? ip
                    : Dns.GetHostAddresses(t.Host).First();
                socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
                socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
                socket.Bind(new IPEndPoint(address, t.Port));
                endpoint = t with { Port = ((IPEndPoint)socket.LocalEndPoint!).Port };
                break;
            default:
                throw new ArgumentException("unknown endpoint", nameof(endpoint));
        }
        socket.Listen(128);
        AcceptBackoff.StartRuntimeTimerThread();
        _listeners.Add((socket, endpoint));
        _tasks.Add(AcceptLoopAsync(socket, endpoint));
        _logger.LogInformation("QMP listening on {Endpoint}", endpoint);
        return endpoint;
    }

    private async Task AcceptLoopAsync(Socket listener, QmpEndpoint endpoint)
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
            sessions.Add(RunSessionAsync(client, peer, slots));
        }
        // The slots outlive no session: wait for them before the semaphore is disposed.
        await Task.WhenAll(sessions).ConfigureAwait(false);
    }

    private async Task RunSessionAsync(Socket client, string peer, SemaphoreSlim slot)
    {
        await using var stream = new NetworkStream(client, ownsSocket: true);
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
            ConnectionBudget.Release();
            slot.Release();
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
            socket.Dispose();
            if (endpoint is QmpEndpoint.Unix u)
            {
                try
                {
                    File.Delete(u.Path);
                }
                catch (IOException e)
                {
                    _logger.LogWarning("could not remove {Path}: {Error}", u.Path, e.Message);
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

    public async ValueTask DisposeAsync()
    {
        await StopAsync().ConfigureAwait(false);
        _stopping.Dispose();
    }
}
