using System.Net.Security;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;
using Backup.Block.Objects;

namespace Backup.Block.Security;

/// <summary>A TLS session could not be set up or was refused; the message is QEMU's words for why.</summary>
public sealed class TlsException : Exception
{
    public TlsException(string message) : base(message) { }

    public TlsException(string message, Exception inner) : base(message, inner) { }

    public TlsException() : this("TLS handshake failed") { }
}

/// <summary>Who may connect to a TLS server: its credentials, and an authz object id checked at each handshake.</summary>
/// <param name="Credentials">Server credentials (see <see cref="TlsCredentials.Find"/>).</param>
/// <param name="AuthzId">QEMU's tls-authz: the id of an authz object, looked up when a client has shaken hands; null lets every verified client in.</param>
/// <param name="Objects">Where the authz object is looked up.</param>
public sealed record TlsServerPolicy(TlsCredentials Credentials, string? AuthzId, ObjectRegistry Objects);

/// <summary>
/// The one place a byte stream becomes TLS, for both ends (QEMU's qio_channel_tls_new_server/_client):
/// the NBD server at NBD_OPT_STARTTLS, QMP listeners with tls-creds, and the nbd block driver as a client.
/// The caller owns <c>transport</c>; the returned stream is layered on it and leaves it open.
///
/// Server: our certificate from the credentials; with verify-peer the client must present a certificate
/// that chains to ca-cert.pem and is not in ca-crl.pem; with an authz id, the certificate's distinguished
/// name (<see cref="DistinguishedName"/>) must be allowed. Client: with verify-peer the server's
/// certificate must chain to our CA, not be revoked, and match <c>hostname</c> (QEMU's tls-hostname: a
/// DNS name or IP address in the subject alternative names, or the common name).
/// </summary>
public static class TlsChannel
{
    /// <summary>TLS 1.2 and 1.3, what QEMU's default GnuTLS priority negotiates with current peers.</summary>
    private const SslProtocols Protocols = SslProtocols.Tls12 | SslProtocols.Tls13;

    public static async ValueTask<Stream> AcceptAsync(Stream transport, TlsServerPolicy policy, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(transport);
        ArgumentNullException.ThrowIfNull(policy);
        if (policy.Credentials is TlsCredentialsPsk psk)
        {
            return await AcceptPskAsync(transport, psk, policy, cancellationToken).ConfigureAwait(false);
        }
        var creds = policy.Credentials as TlsCredentialsX509 ?? throw new TlsException("TLS credentials of this kind are not supported");
        string? peerProblem = null;
        var ssl = new SslStream(transport, leaveInnerStreamOpen: true);
        try
        {
            var options = new SslServerAuthenticationOptions
            {
                ServerCertificateContext = creds.CertificateContext,
                ClientCertificateRequired = creds.VerifyPeer,
                EnabledSslProtocols = Protocols,
                CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
                RemoteCertificateValidationCallback = (_, certificate, chain, _) =>
                {
                    if (!creds.VerifyPeer)
                    {
                        return true;
                    }
                    peerProblem = certificate is null
                        ? "No certificate was found."
                        : creds.VerifyPeerCertificate(AsCertificate2(certificate), ExtraCertificates(chain));
                    return peerProblem is null;
                },
            };
            try
            {
                await ssl.AuthenticateAsServerAsync(options, cancellationToken).ConfigureAwait(false);
            }
            catch (AuthenticationException e)
            {
                throw new TlsException(peerProblem is not null ? $"Verify failed: {peerProblem}" : $"TLS handshake failed: {Describe(e)}", e);
            }
            if (policy.AuthzId is { } authzId)
            {
                // QEMU checks the name only when it verified the peer: without verify-peer there is no trusted name.
                if (!creds.VerifyPeer || ssl.RemoteCertificate is not { } remote)
                {
                    throw new TlsException("TLS x509 authz check requires a client certificate (verify-peer=on)");
                }
                var dn = DistinguishedName.Format(AsCertificate2(remote).SubjectName);
                bool allowed;
                try
                {
                    allowed = Authz.IsAllowedById(policy.Objects, authzId, dn);
                }
                catch (BlockException e)
                {
                    throw new TlsException(e.Message, e);
                }
                if (!allowed)
                {
                    throw new TlsException($"TLS x509 authz check for {dn} is denied");
                }
            }
            return ssl;
        }
        catch
        {
            await ssl.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <param name="hostname">The name the server's certificate must carry (QEMU's tls-hostname, else the host connected to); null skips the name check.</param>
    public static async ValueTask<Stream> ConnectAsync(Stream transport, TlsCredentials credentials, string? hostname, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(transport);
        if (credentials is TlsCredentialsPsk psk)
        {
            if (psk.Endpoint != TlsEndpoint.Client)
            {
                throw new TlsException("Expected TLS credentials for a client endpoint");
            }
            return await PskTlsStream.HandshakeAsync(transport, psk, server: false, cancellationToken).ConfigureAwait(false);
        }
        var creds = credentials as TlsCredentialsX509 ?? throw new TlsException("TLS credentials of this kind are not supported");
        if (creds.Endpoint != TlsEndpoint.Client)
        {
            throw new TlsException("Expected TLS credentials for a client endpoint");
        }
        string? problem = null;
        var ssl = new SslStream(transport, leaveInnerStreamOpen: true);
        try
        {
            var options = new SslClientAuthenticationOptions
            {
                // SNI and .NET's name check use the target host; an IP address is matched against IP SANs.
                TargetHost = hostname ?? "",
                ClientCertificateContext = creds.CertificateContext,
                EnabledSslProtocols = Protocols,
                CertificateRevocationCheckMode = X509RevocationMode.NoCheck,
                RemoteCertificateValidationCallback = (_, certificate, chain, errors) =>
                {
                    if (!creds.VerifyPeer)
                    {
                        return true;
                    }
                    if (certificate is null)
                    {
                        problem = "Verify failed: No certificate was found.";
                        return false;
                    }
                    if (creds.VerifyPeerCertificate(AsCertificate2(certificate), ExtraCertificates(chain)) is { } why)
                    {
                        problem = $"Verify failed: {why}";
                        return false;
                    }
                    if (hostname is not null && (errors & SslPolicyErrors.RemoteCertificateNameMismatch) != 0)
                    {
                        problem = $"Certificate does not match the hostname {hostname}";
                        return false;
                    }
                    return true;
                },
            };
            try
            {
                await ssl.AuthenticateAsClientAsync(options, cancellationToken).ConfigureAwait(false);
            }
            catch (AuthenticationException e)
            {
                throw new TlsException(problem ?? $"TLS handshake failed: {Describe(e)}", e);
            }
            return ssl;
        }
        catch
        {
            await ssl.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>
    /// PSK: the client proved it holds the key of the username it sent; with tls-authz that username must
    /// be allowed (QEMU 8's check; QSD 7.2 ignores tls-authz with PSK credentials and lets every key holder in).
    /// </summary>
    private static async ValueTask<Stream> AcceptPskAsync(Stream transport, TlsCredentialsPsk psk, TlsServerPolicy policy,
        CancellationToken cancellationToken)
    {
        var session = await PskTlsStream.HandshakeAsync(transport, psk, server: true, cancellationToken).ConfigureAwait(false);
        try
        {
            if (policy.AuthzId is { } authzId)
            {
                var username = session.PeerIdentity ?? throw new TlsException("No PSK username");
                bool allowed;
                try
                {
                    allowed = Authz.IsAllowedById(policy.Objects, authzId, username);
                }
                catch (BlockException e)
                {
                    throw new TlsException(e.Message, e);
                }
                if (!allowed)
                {
                    throw new TlsException($"TLS PSK authz check for {username} is denied");
                }
            }
            return session;
        }
        catch
        {
            await session.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    private static X509Certificate2 AsCertificate2(X509Certificate certificate) =>
        certificate as X509Certificate2 ?? X509CertificateLoader.LoadCertificate(certificate.GetRawCertData());

    /// <summary>Intermediates the peer sent with its certificate.</summary>
    private static X509Certificate2Collection? ExtraCertificates(X509Chain? chain)
    {
        if (chain is null || chain.ChainPolicy.ExtraStore.Count == 0)
        {
            return null;
        }
        return [.. chain.ChainPolicy.ExtraStore];
    }

    /// <summary>The handshake's failure in a line, without .NET's type names: the innermost message, which is OpenSSL's.</summary>
    private static string Describe(Exception e)
    {
        var inner = e;
        while (inner.InnerException is not null)
        {
            inner = inner.InnerException;
        }
        return inner.Message;
    }
}
