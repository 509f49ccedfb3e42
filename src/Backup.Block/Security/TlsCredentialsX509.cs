using System.Net.Security;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Backup.Block.Objects;

namespace Backup.Block.Security;

/// <summary>What tls-creds-x509 is created from (QEMU's TlsCredsX509Properties).</summary>
/// <param name="Id">The object's id.</param>
/// <param name="Dir">The folder with QEMU's file names: ca-cert.pem, ca-crl.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem.</param>
/// <param name="Endpoint">Which end.</param>
/// <param name="VerifyPeer">Check the peer's certificate (QEMU's default: on).</param>
/// <param name="SanityCheck">Check our own certificates when loading (QEMU's default: on).</param>
/// <param name="PasswordId">A secret holding the password of an encrypted private key.</param>
public sealed record TlsX509Options(string Id, string? Dir, TlsEndpoint Endpoint, bool VerifyPeer = true, bool SanityCheck = true, string? PasswordId = null);

/// <summary>
/// tls-creds-x509: the CA list, an optional CRL, and our own certificate and key, loaded from QEMU's file
/// names in <c>dir</c> with QEMU's checks and error texts (crypto/tlscredsx509.c). A server needs
/// ca-cert.pem, server-cert.pem and server-key.pem; a client needs ca-cert.pem and may have a
/// client certificate. The files are read once, at creation, as QEMU does.
/// </summary>
public sealed class TlsCredentialsX509 : TlsCredentials, IDisposable
{
    private const string CaCertFile = "ca-cert.pem";
    private const string CaCrlFile = "ca-crl.pem";
    private const string ServerCertFile = "server-cert.pem";
    private const string ServerKeyFile = "server-key.pem";
    private const string ClientCertFile = "client-cert.pem";
    private const string ClientKeyFile = "client-key.pem";

    private const string ServerAuthOid = "1.3.6.1.5.5.7.3.1";
    private const string ClientAuthOid = "1.3.6.1.5.5.7.3.2";
    private const string AnyPurposeOid = "2.5.29.37.0";

    private TlsCredentialsX509(TlsX509Options options, X509Certificate2Collection authorities, CertificateRevocationList? crl,
        X509Certificate2? certificate, X509Certificate2Collection chain)
        : base(options.Id, options.Endpoint, options.VerifyPeer)
    {
        Authorities = authorities;
        Revocations = crl;
        Certificate = certificate;
        CertificateContext = certificate is null ? null : SslStreamCertificateContext.Create(certificate, chain, offline: true);
    }

    /// <summary>The trusted CAs (ca-cert.pem): the roots a peer's certificate must chain to.</summary>
    public X509Certificate2Collection Authorities { get; }

    /// <summary>Revoked certificates (ca-crl.pem), or null.</summary>
    public CertificateRevocationList? Revocations { get; }

    /// <summary>Our certificate with its private key; null for a client without one.</summary>
    public X509Certificate2? Certificate { get; }

    /// <summary>Our certificate and the rest of its file's chain, as the TLS handshake sends it.</summary>
    public SslStreamCertificateContext? CertificateContext { get; }

    /// <summary>Loads the credentials; throws <see cref="BlockException"/> with QEMU's text for each failure, in QEMU's order.</summary>
    public static TlsCredentialsX509 Load(TlsX509Options options, ObjectRegistry objects)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(objects);
        var isServer = options.Endpoint == TlsEndpoint.Server;
        var caCert = FilePath(options.Dir, CaCertFile, required: true)!;
        string? crl = null;
        string? cert;
        string? key;
        if (isServer)
        {
            crl = FilePath(options.Dir, CaCrlFile, required: false);
            cert = FilePath(options.Dir, ServerCertFile, required: true);
            key = FilePath(options.Dir, ServerKeyFile, required: true);
            // dh-params.pem: TLS 1.2+ stacks choose their own (EC)DHE groups; QEMU's optional file is not read.
        }
        else
        {
            cert = FilePath(options.Dir, ClientCertFile, required: false);
            key = FilePath(options.Dir, ClientKeyFile, required: false);
        }

        if (options.SanityCheck)
        {
            SanityCheck(isServer, caCert, cert);
        }

        var authorities = ImportList(caCert) is { Count: > 0 } list
            ? list
            : throw new BlockException($"Cannot load CA certificate '{caCert}': No certificate was found.");

        X509Certificate2? certificate = null;
        var chain = new X509Certificate2Collection();
        if (cert is not null && key is not null)
        {
            var password = options.PasswordId is { } pid ? objects.LookupSecretAsUtf8(pid) : null;
            certificate = LoadWithKey(cert, key, password);
            // Certificates after the first in the file are intermediates that the handshake sends along.
            var all = ImportList(cert) ?? [];
            for (var i = 1; i < all.Count; i++)
            {
                chain.Add(all[i]);
            }
        }

        CertificateRevocationList? revocations = null;
        if (crl is not null)
        {
            revocations = CertificateRevocationList.Load(crl, authorities);
        }
        return new TlsCredentialsX509(options, authorities, revocations, certificate, chain);
    }

    public void Dispose()
    {
        Certificate?.Dispose();
        foreach (var c in Authorities)
        {
            c.Dispose();
        }
    }

    /// <summary>
    /// Checks a peer's certificate against our CAs and CRL: the chain to one of our CAs, the validity
    /// times, and revocation. Null when it is good, else gnutls's words for what is wrong.
    /// </summary>
    internal string? VerifyPeerCertificate(X509Certificate2 peer, X509Certificate2Collection? extra)
    {
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(Authorities);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        chain.ChainPolicy.DisableCertificateDownloads = true;
        if (extra is not null)
        {
            chain.ChainPolicy.ExtraStore.AddRange(extra);
        }
        if (!chain.Build(peer))
        {
            var flags = chain.ChainStatus.Aggregate(X509ChainStatusFlags.NoError, (a, s) => a | s.Status);
            return flags switch
            {
                _ when (flags & (X509ChainStatusFlags.NotTimeValid | X509ChainStatusFlags.NotTimeNested)) != 0 && peer.NotAfter < DateTime.Now => "The certificate has expired",
                _ when (flags & X509ChainStatusFlags.NotTimeValid) != 0 => "The certificate is not yet activated",
                _ when (flags & (X509ChainStatusFlags.UntrustedRoot | X509ChainStatusFlags.PartialChain)) != 0 => "The certificate hasn't got a known issuer",
                _ when (flags & X509ChainStatusFlags.NotSignatureValid) != 0 => "The certificate signature is invalid",
                _ => "The certificate is not trusted",
            };
        }
        if (Revocations is not null)
        {
            foreach (var element in chain.ChainElements)
            {
                if (Revocations.IsRevoked(element.Certificate))
                {
                    return "The certificate has been revoked";
                }
            }
        }
        return null;
    }

    // ------------------------------------------------------------------ loading

    private static X509Certificate2Collection? ImportList(string path)
    {
        try
        {
            var list = new X509Certificate2Collection();
            list.ImportFromPemFile(path);
            return list;
        }
        catch (Exception e) when (e is CryptographicException or IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    private static X509Certificate2 LoadWithKey(string cert, string key, string? password)
    {
        try
        {
            var loaded = password is null
                ? X509Certificate2.CreateFromPemFile(cert, key)
                : X509Certificate2.CreateFromEncryptedPemFile(cert, password, key);
            return loaded;
        }
        catch (Exception e) when (e is CryptographicException or ArgumentException or IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Cannot load certificate '{cert}' & key '{key}': {KeyProblem(key, password)}");
        }
    }

    /// <summary>gnutls's words for why a certificate and key did not load together.</summary>
    private static string KeyProblem(string key, string? password)
    {
        string text;
        try
        {
            text = File.ReadAllText(key);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return "Error while reading file.";
        }
        if (!PemEncoding.TryFind(text, out var fields))
        {
            return "Base64 decoding error.";
        }
        var label = text[fields.Label];
        if (label == "ENCRYPTED PRIVATE KEY" || text.Contains("Proc-Type: 4,ENCRYPTED", StringComparison.Ordinal))
        {
            return password is null ? "The request is invalid." : "Decryption has failed.";
        }
        return "The certificate and the given key do not match.";
    }

    // ------------------------------------------------------------------ QEMU's sanity check

    private static void SanityCheck(bool isServer, string caCertFile, string? certFile)
    {
        X509Certificate2? cert = null;
        if (certFile is not null)
        {
            var list = ImportList(certFile);
            cert = list is { Count: > 0 } ? list[0] : throw new BlockException(isServer
                ? $"Unable to import server certificate {certFile}: No certificate was found."
                : $"Unable to import client certificate {certFile}: No certificate was found.");
        }
        var cas = ImportList(caCertFile) is { Count: > 0 } l ? l : throw new BlockException($"Unable to import CA certificate list {caCertFile}");
        if (cert is not null)
        {
            CheckCertificate(cert, certFile!, isServer, isCA: false);
        }
        foreach (var ca in cas)
        {
            CheckCertificate(ca, caCertFile, isServer, isCA: true);
        }
        if (cert is not null)
        {
            CheckPair(cert, certFile!, cas, caCertFile, isServer);
        }
    }

    private static void CheckCertificate(X509Certificate2 cert, string file, bool isServer, bool isCA)
    {
        var now = DateTime.Now;
        var who = isCA ? "CA" : isServer ? "server" : "client";
        if (cert.NotAfter < now)
        {
            throw new BlockException($"The {who} certificate {file} has expired");
        }
        if (cert.NotBefore > now)
        {
            throw new BlockException($"The {who} certificate {file} is not yet active");
        }

        var constraints = cert.Extensions.OfType<X509BasicConstraintsExtension>().FirstOrDefault();
        if (constraints is null)
        {
            if (isCA)
            {
                throw new BlockException($"The certificate {file} is missing basic constraints for a CA");
            }
        }
        else if (constraints.CertificateAuthority && !isCA)
        {
            throw new BlockException($"The certificate {file} basic constraints show a CA, but we need one for a {(isServer ? "server" : "client")}");
        }
        else if (!constraints.CertificateAuthority && isCA)
        {
            throw new BlockException($"The certificate {file} basic constraints do not show a CA");
        }

        // Key usage and purpose only refuse when the extension is critical, as in QEMU.
        if (cert.Extensions.OfType<X509KeyUsageExtension>().FirstOrDefault() is { Critical: true } usage)
        {
            if (isCA && (usage.KeyUsages & X509KeyUsageFlags.KeyCertSign) == 0)
            {
                throw new BlockException($"Certificate {file} usage does not permit certificate signing");
            }
            if (!isCA && (usage.KeyUsages & X509KeyUsageFlags.DigitalSignature) == 0)
            {
                throw new BlockException($"Certificate {file} usage does not permit digital signature");
            }
            if (!isCA && (usage.KeyUsages & X509KeyUsageFlags.KeyEncipherment) == 0)
            {
                throw new BlockException($"Certificate {file} usage does not permit key encipherment");
            }
        }
        if (!isCA && cert.Extensions.OfType<X509EnhancedKeyUsageExtension>().FirstOrDefault() is { Critical: true } purposes)
        {
            var oids = purposes.EnhancedKeyUsages.Cast<Oid>().Select(o => o.Value).ToHashSet(StringComparer.Ordinal);
            var any = oids.Contains(AnyPurposeOid);
            if (isServer && !any && !oids.Contains(ServerAuthOid))
            {
                throw new BlockException($"Certificate {file} purpose does not allow use with a TLS server");
            }
            if (!isServer && !any && !oids.Contains(ClientAuthOid))
            {
                throw new BlockException($"Certificate {file} purpose does not allow use with a TLS client");
            }
        }
    }

    private static void CheckPair(X509Certificate2 cert, string certFile, X509Certificate2Collection cas, string caFile, bool isServer)
    {
        using var chain = new X509Chain();
        chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
        chain.ChainPolicy.CustomTrustStore.AddRange(cas);
        chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
        chain.ChainPolicy.DisableCertificateDownloads = true;
        if (chain.Build(cert))
        {
            return;
        }
        var flags = chain.ChainStatus.Aggregate(X509ChainStatusFlags.NoError, (a, s) => a | s.Status);
        var reason = (flags & (X509ChainStatusFlags.UntrustedRoot | X509ChainStatusFlags.PartialChain)) != 0
            ? "The certificate hasn't got a known issuer"
            : (flags & X509ChainStatusFlags.NotSignatureValid) != 0 ? "The certificate is not trusted"
            : "Invalid certificate";
        _ = isServer;
        throw new BlockException($"Our own certificate {certFile} failed validation against {caFile}: {reason}");
    }
}
