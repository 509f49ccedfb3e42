using Backup.Block.Objects;
using Backup.Block.Posix;

namespace Backup.Block.Security;

/// <summary>Which end of a TLS session credentials are for (QEMU's QCryptoTLSCredsEndpoint).</summary>
public enum TlsEndpoint
{
    Client,
    Server,
}

/// <summary>
/// TLS credentials (QEMU's tls-creds objects): which end they serve and whether the peer must prove who
/// it is. The kinds are <see cref="TlsCredentialsX509"/> and the refused PSK kind (see
/// <see cref="TlsCredentialsPsk"/>).
/// </summary>
public abstract class TlsCredentials
{
    protected TlsCredentials(string id, TlsEndpoint endpoint, bool verifyPeer)
    {
        Id = id;
        Endpoint = endpoint;
        VerifyPeer = verifyPeer;
    }

    public string Id { get; }

    public TlsEndpoint Endpoint { get; }

    /// <summary>Server: the client must present a certificate signed by the CA. Client: the server's certificate and name are checked.</summary>
    public bool VerifyPeer { get; }

    /// <summary>
    /// The credentials with id <paramref name="id"/> for <paramref name="endpoint"/>, with QEMU's errors
    /// (nbd-server-start, chardev tls-creds, the nbd block driver).
    /// </summary>
    public static TlsCredentials Find(ObjectRegistry objects, string id, TlsEndpoint endpoint)
    {
        ArgumentNullException.ThrowIfNull(objects);
        var creds = objects.Find(id) switch
        {
            null => throw new BlockException($"No TLS credentials with id '{id}'"),
            TlsCredentials c => c,
            _ => throw new BlockException($"Object with id '{id}' is not TLS credentials"),
        };
        if (creds.Endpoint != endpoint)
        {
            throw new BlockException(endpoint == TlsEndpoint.Server
                ? "Expected TLS credentials for a server endpoint"
                : "Expected TLS credentials for a client endpoint");
        }
        return creds;
    }

    /// <summary>
    /// QEMU's path of one credential file: DIR/NAME as given (no normalisation). A missing optional file
    /// gives null; a missing required one, or one that cannot be read, QEMU's error.
    /// </summary>
    internal static string? FilePath(string? dir, string name, bool required)
    {
        if (dir is null)
        {
            return required ? throw new BlockException("Missing 'dir' property value") : null;
        }
        var path = dir + "/" + name;
        try
        {
            using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read);
            return path;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            var errno = LibC.ErrnoOf(e);
            if (errno == LibC.ENOENT && !required)
            {
                return null;
            }
            throw new BlockException($"Unable to access credentials {path}: {LibC.Describe(errno)}");
        }
    }
}

/// <summary>
/// tls-creds-psk. QEMU's properties are checked (dir, keys.psk), then the object is refused: .NET's TLS
/// (SslStream, over OpenSSL on Linux) offers no pre-shared-key cipher suites or callbacks, and a second
/// TLS stack in the daemon would be a larger risk than the feature is worth. Use tls-creds-x509.
/// </summary>
public static class TlsCredentialsPsk
{
    public const string NotSupported = "TLS-PSK credentials (tls-creds-psk) are not supported by backupd: its TLS stack has no pre-shared key support; use tls-creds-x509";

    public static TlsCredentials Create(string id, string? dir, TlsEndpoint endpoint)
    {
        _ = id;
        _ = endpoint;
        TlsCredentials.FilePath(dir, "keys.psk", required: true);
        throw new BlockException(NotSupported);
    }
}
