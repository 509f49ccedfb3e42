using Backup.Block.Security;

namespace Backup.Block.Drivers.Nbd;

/// <summary>The nbd driver's side of NBD_OPT_STARTTLS: the block layer's one TLS wrapper, as a client.</summary>
internal sealed class NbdClientTls(TlsCredentials credentials, string? hostname) : INbdClientTls
{
    public async ValueTask<Stream> AuthenticateAsync(Stream plain, CancellationToken cancellationToken) =>
        await TlsChannel.ConnectAsync(plain, credentials, hostname, cancellationToken).ConfigureAwait(false);
}
