namespace Backup.Nbd.Server;

/// <summary>Where the NBD server listens (QEMU's SocketAddress, the kinds this daemon supports).</summary>
public abstract record NbdServerAddress;

/// <summary>A Unix domain socket; <paramref name="Abstract"/> selects Linux's abstract namespace (no file).</summary>
public sealed record NbdUnixAddress(string Path, bool Abstract = false) : NbdServerAddress;

/// <summary>A TCP socket; <paramref name="Port"/> is a string as in QEMU (port 0 picks a free one).</summary>
public sealed record NbdInetAddress(string Host, string Port, bool? Ipv4 = null, bool? Ipv6 = null) : NbdServerAddress;

/// <summary>
/// A socket the parent process passed (QEMU's <c>addr.type=fd,addr.str=N</c>): adopted and listened on.
/// <paramref name="Str"/> is the descriptor's number as given.
/// </summary>
public sealed record NbdFdAddress(string Str) : NbdServerAddress;
