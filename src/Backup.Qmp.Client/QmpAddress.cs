using System.Globalization;
using System.Net;
using System.Net.Sockets;

namespace Backup.Qmp.Client;

/// <summary>
/// Where a QMP server listens, in backupd's <c>--qmp</c> spelling: <c>unix:PATH</c> or <c>tcp:HOST:PORT</c>
/// (an IPv6 host may be bracketed: <c>tcp:[::1]:4444</c>).
/// </summary>
public abstract record QmpAddress
{
    private QmpAddress() { }

    /// <summary>A Unix domain socket.</summary>
    public sealed record Unix(string Path) : QmpAddress
    {
        public override string ToString() => "unix:" + Path;
    }

    /// <summary>A TCP listener.</summary>
    public sealed record Tcp(string Host, int Port) : QmpAddress
    {
        public override string ToString() => string.Create(CultureInfo.InvariantCulture, $"tcp:{Host}:{Port}");
    }

    /// <summary>Parses <c>unix:PATH</c> or <c>tcp:HOST:PORT</c>; throws <see cref="FormatException"/> otherwise.</summary>
    public static QmpAddress Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        if (text.StartsWith("unix:", StringComparison.Ordinal) && text.Length > 5)
        {
            return new Unix(text[5..]);
        }
        if (text.StartsWith("tcp:", StringComparison.Ordinal))
        {
            var rest = text[4..];
            var colon = rest.LastIndexOf(':');
            if (colon > 0 && int.TryParse(rest[(colon + 1)..], NumberStyles.None, CultureInfo.InvariantCulture, out var port) && port is > 0 and <= 65535)
            {
                return new Tcp(rest[..colon].Trim('[', ']'), port);
            }
        }
        throw new FormatException($"'{text}': expected 'unix:PATH' or 'tcp:HOST:PORT'");
    }

    internal async Task<Socket> ConnectAsync(CancellationToken cancellationToken)
    {
        switch (this)
        {
            case Unix u:
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await socket.ConnectAsync(new UnixDomainSocketEndPoint(u.Path), cancellationToken).ConfigureAwait(false);
                    return socket;
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            }
            case Tcp t:
            {
                // DnsEndPoint lets the socket try every address of the host (localhost: ::1 then 127.0.0.1).
                var socket = new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
                try
                {
                    await socket.ConnectAsync(new DnsEndPoint(t.Host, t.Port), cancellationToken).ConfigureAwait(false);
                    return socket;
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
            }
            default:
                throw new InvalidOperationException("unknown address kind");
        }
    }
}
