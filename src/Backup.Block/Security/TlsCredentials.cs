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
/// it is. The kinds are <see cref="TlsCredentialsX509"/> and <see cref="TlsCredentialsPsk"/>.
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
/// tls-creds-psk: a key shared in advance instead of certificates. keys.psk in <c>dir</c> holds
/// <c>username:hexkey</c> lines (GnuTLS's psktool format). A server accepts any username in the file, read
/// at each handshake as GnuTLS does; a client sends <see cref="Username"/> (default "qemu") with its key,
/// read when the object is created, as QEMU does.
/// </summary>
public sealed class TlsCredentialsPsk : TlsCredentials
{
    private const string DefaultUsername = "qemu";

    private readonly string _keysPath;

    private TlsCredentialsPsk(string id, TlsEndpoint endpoint, string keysPath, string username, byte[]? clientKey)
        : base(id, endpoint, verifyPeer: false)
    {
        _keysPath = keysPath;
        Username = username;
        ClientKey = clientKey;
    }

    /// <summary>The identity a client sends.</summary>
    public string Username { get; }

    internal byte[]? ClientKey { get; }

    public static TlsCredentialsPsk Create(string id, string? dir, TlsEndpoint endpoint, string? username)
    {
        if (endpoint == TlsEndpoint.Server && username is not null)
        {
            throw new BlockException("username should not be set when endpoint=server");
        }
        var path = FilePath(dir, "keys.psk", required: true)!;
        if (endpoint == TlsEndpoint.Server)
        {
            return new TlsCredentialsPsk(id, endpoint, path, DefaultUsername, null);
        }
        username ??= DefaultUsername;
        var key = Lookup(ReadKeys(path), username, path) ?? throw new BlockException($"Username {username} not found in PSK file {path}");
        return new TlsCredentialsPsk(id, endpoint, path, username, key);
    }

    /// <summary>Server side: the key for <paramref name="username"/>, or null with the reason.</summary>
    internal byte[]? ServerKey(string username, out string? problem)
    {
        problem = null;
        try
        {
            var key = Lookup(ReadKeys(_keysPath), username, _keysPath);
            if (key is null)
            {
                problem = $"Unknown PSK username {username}";
            }
            return key;
        }
        catch (BlockException e)
        {
            problem = e.Message;
            return null;
        }
    }

    private static string ReadKeys(string path)
    {
        try
        {
            return File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Cannot read PSK file {path}: {LibC.Describe(LibC.ErrnoOf(e))}");
        }
    }

    private static byte[]? Lookup(string keys, string username, string path)
    {
        foreach (var raw in keys.Split('\n'))
        {
            var line = raw.TrimEnd('\r');
            var colon = line.IndexOf(':', StringComparison.Ordinal);
            if (colon < 0 || !line.AsSpan(0, colon).SequenceEqual(username))
            {
                continue;
            }
            try
            {
                var key = Convert.FromHexString(line.AsSpan(colon + 1).Trim());
                return key.Length > 0 ? key : throw new FormatException();
            }
            catch (FormatException)
            {
                throw new BlockException($"Cannot decode hex key for {username} in {path}");
            }
        }
        return null;
    }
}
