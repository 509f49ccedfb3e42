using System.IO.Pipelines;
using System.Net.Sockets;
using Backup.Block.Security;
using Backup.Nbd.Handshake;
using Backup.Nbd.Transmission;
using Microsoft.Extensions.Logging;

namespace Backup.Nbd.Server;

/// <summary>
/// One client connection: handshake, then transmission on the chosen export. Owns its socket.
/// <see cref="Abort"/> ends it from outside (export removed, server stopped); <see cref="Completion"/>
/// finishes once every request it started has finished.
/// </summary>
public sealed class NbdConnection : IDisposable
{
    private const int ReadBufferSize = 256 * 1024;

    /// <summary>SO_SNDBUF asked for on Unix sockets (see <see cref="TryEnlargeSendBuffer"/>).</summary>
    internal const int UnixSendBufferSize = 2 * 1024 * 1024;

    private readonly Socket _socket;
    private readonly INbdExportDirectory _directory;
    private readonly ILogger _logger;
    private readonly TlsServerPolicy? _tls;
    private readonly TimeSpan _handshakeLimit;
    private readonly CancellationTokenSource _cts = new();
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <param name="handshakeLimit">How long the client has to finish negotiating (TLS included) before it is dropped; <see cref="Timeout.InfiniteTimeSpan"/> for no limit.</param>
    internal NbdConnection(Socket socket, INbdExportDirectory directory, ILogger logger, string client, TlsServerPolicy? tls = null,
        TimeSpan? handshakeLimit = null)
    {
        _socket = socket;
        _tls = tls;
        _handshakeLimit = handshakeLimit ?? Timeout.InfiniteTimeSpan;
        _directory = directory;
        _logger = logger;
        Client = client;
    }

    /// <summary>Who is connected, for logs.</summary>
    public string Client { get; }

    internal Task Completion => _completion.Task;

    internal async Task RunAsync()
    {
        if (_socket.AddressFamily == AddressFamily.Unix)
        {
            TryEnlargeSendBuffer(_socket);
        }
        var stream = new NetworkStream(_socket, ownsSocket: false);
        var input = CreateReader(stream);
        var negotiation = new NbdHandshake(_directory, input, stream, _logger, Client, _tls, CreateReader);
        // A client that connects and never negotiates holds a descriptor and a connection slot for nothing
        // (CVE-2024-7409): as QEMU, it gets a fixed time to reach transmission, then it is dropped.
        using var handshakeDeadline = CancellationTokenSource.CreateLinkedTokenSource(_cts.Token);
        handshakeDeadline.CancelAfter(_handshakeLimit);
        try
        {
            HandshakeResult? handshake;
            try
            {
                handshake = await negotiation.RunAsync(handshakeDeadline.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (!_cts.IsCancellationRequested)
            {
                _logger.LogInformation("NBD client {Client}: handshake not finished within {Seconds} s; disconnected",
                    Client, _handshakeLimit.TotalSeconds);
                return;
            }
            if (handshake is null)
            {
                return;
            }
            handshakeDeadline.CancelAfter(Timeout.InfiniteTimeSpan);
            var export = handshake.Export;
            if (!export.TryAttach(this))
            {
                return;
            }
            _logger.LogInformation("NBD client {Client} attached to export '{Export}'", Client, export.Id);
            try
            {
                // After STARTTLS the handshake's streams are the TLS session's.
                using var transmission = new NbdTransmission(handshake, negotiation.Input, negotiation.Output, _logger, Client, _cts.Token,
                    inputStream: negotiation.Output);
                await transmission.RunAsync().ConfigureAwait(false);
            }
            finally
            {
                export.Detach(this);
            }
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or SocketException or ObjectDisposedException)
        {
            _logger.LogDebug("NBD client {Client}: connection ended: {Error}", Client, e.Message);
        }
#pragma warning disable CA1031 // a bug in one connection must not take the daemon down
        catch (Exception e)
#pragma warning restore CA1031
        {
            _logger.LogError(e, "NBD client {Client}: connection failed", Client);
        }
        finally
        {
            await negotiation.Input.CompleteAsync().ConfigureAwait(false);
            if (negotiation.TlsStream is { } tls)
            {
                await tls.DisposeAsync().ConfigureAwait(false);
            }
            await stream.DisposeAsync().ConfigureAwait(false);
            _socket.Dispose();
            Dispose();
            _completion.TrySetResult();
        }
    }

    private static PipeReader CreateReader(Stream stream) =>
        PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: ReadBufferSize, minimumReadSize: ReadBufferSize / 4, leaveOpen: true));

    public void Dispose() => _cts.Dispose();

    /// <summary>
    /// A Unix socket's send buffer (default 208 KiB) is smaller than one 256 KiB READ reply, so each reply would
    /// fill it, wait for the peer, and resume on another thread: measured 3× the context switches of QSD for an
    /// nbdcopy to null. With room for several replies, sends complete at once. The kernel caps the value at
    /// net.core.wmem_max. Not done for TCP, where setting SO_SNDBUF would turn off the kernel's autotuning.
    /// </summary>
    private void TryEnlargeSendBuffer(Socket socket)
    {
        try
        {
            if (socket.SendBufferSize < UnixSendBufferSize)
            {
                socket.SendBufferSize = UnixSendBufferSize;
            }
        }
        catch (SocketException e)
        {
            _logger.LogDebug("NBD client {Client}: SO_SNDBUF not set: {Error}", Client, e.Message);
        }
    }

    /// <summary>
    /// The client has closed or reset its end (e.g. it was killed), though this connection may not have
    /// read the end of its stream yet.
    /// </summary>
    internal bool PeerGone => PeerProbe.PeerGone(_socket);

    /// <summary>Drops the connection: pending reads and writes fail, running requests are cancelled.</summary>
    internal void Abort()
    {
        try
        {
            _cts.Cancel();
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is ObjectDisposedException or SocketException)
        {
            // Already gone.
        }
    }
}
