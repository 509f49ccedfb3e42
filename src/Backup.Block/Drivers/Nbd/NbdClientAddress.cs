using System.Net;
using System.Net.Sockets;

namespace Backup.Block.Drivers.Nbd;

/// <summary>Where the nbd driver connects (QEMU's SocketAddress, the kinds a client can reach here).</summary>
public abstract record NbdClientAddress
{
    /// <summary>How QEMU names the address in "Failed to connect to '…'".</summary>
    public abstract string Display { get; }

    /// <summary>Connects a new socket; errors are QEMU's "Failed to connect to 'ADDR': REASON".</summary>
    public async ValueTask<Socket> ConnectAsync(CancellationToken cancellationToken)
    {
        try
        {
            return await ConnectCoreAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (SocketException e)
        {
            throw new BlockException($"Failed to connect to '{Display}': {Posix.LibC.Describe(Errno(e.SocketErrorCode))}", e);
        }
    }

    protected abstract ValueTask<Socket> ConnectCoreAsync(CancellationToken cancellationToken);

    private static int Errno(SocketError error) => error switch
    {
        SocketError.AddressNotAvailable => 2, // a Unix socket path that does not exist: ENOENT
        SocketError.ConnectionRefused => 111,
        SocketError.AccessDenied => 13,
        SocketError.TimedOut => 110,
        SocketError.HostUnreachable => 113,
        SocketError.NetworkUnreachable => 101,
        SocketError.HostNotFound => -2,
        _ => 5,
    };
}

/// <summary>A Unix domain socket by path.</summary>
public sealed record NbdClientUnixAddress(string Path) : NbdClientAddress
{
    public override string Display => Path;

    protected override async ValueTask<Socket> ConnectCoreAsync(CancellationToken cancellationToken)
    {
        if (!System.IO.File.Exists(Path) && !Directory.Exists(Path))
        {
            // .NET reports a missing socket file as AddressNotAvailable; say what connect(2) says.
            throw new SocketException((int)SocketError.AddressNotAvailable);
        }
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(Path), cancellationToken).ConfigureAwait(false);
            return socket;
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }
}

/// <summary>A TCP host and port (a string, as in QEMU).</summary>
public sealed record NbdClientInetAddress(string Host, string Port) : NbdClientAddress
{
    public override string Display => $"{Host}:{Port}";

    protected override async ValueTask<Socket> ConnectCoreAsync(CancellationToken cancellationToken)
    {
        if (!int.TryParse(Port, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var port) ||
            port > 65535)
        {
            throw new BlockException($"Failed to connect to '{Display}': Servname not supported for ai_socktype");
        }
        IPAddress[] addresses;
        try
        {
            addresses = IPAddress.TryParse(Host, out var ip) ? [ip] : await Dns.GetHostAddressesAsync(Host, cancellationToken).ConfigureAwait(false);
        }
        catch (SocketException)
        {
            throw new BlockException($"address resolution failed for {Host}:{Port}: Name or service not known");
        }
        SocketException? last = null;
        foreach (var address in addresses)
        {
            var socket = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            try
            {
                await socket.ConnectAsync(new IPEndPoint(address, port), cancellationToken).ConfigureAwait(false);
                return socket;
            }
            catch (SocketException e)
            {
                last = e;
                socket.Dispose();
            }
        }
        throw last ?? new SocketException((int)SocketError.HostNotFound);
    }
}
