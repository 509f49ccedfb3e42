namespace Backup.Block.Objects;

/// <summary>A secret object (QEMU's <c>secret</c>): bytes other objects refer to by id, e.g. a key's password.</summary>
public sealed record SecretObject(string Id, byte[] Value);

/// <summary>
/// The objects the daemon holds, by id (QEMU's /objects container): secrets, TLS credentials and
/// authorization lists. The QMP layer creates and deletes them; the NBD server, QMP listeners and block
/// drivers look them up by id.
///
/// Deleting an object only removes its id, as QEMU's object-del does for these types: whoever took the
/// object itself (an NBD server's TLS credentials) keeps using it; whoever looks it up by id each time
/// (tls-authz, at every TLS handshake) no longer finds it.
/// </summary>
public sealed class ObjectRegistry
{
    private readonly Lock _lock = new();
    private readonly Dictionary<string, object> _objects = new(StringComparer.Ordinal);

    public bool TryAdd(string id, object value)
    {
        lock (_lock)
        {
            return _objects.TryAdd(id, value);
        }
    }

    public bool Remove(string id)
    {
        lock (_lock)
        {
            return _objects.Remove(id);
        }
    }

    public object? Find(string id)
    {
        lock (_lock)
        {
            return _objects.GetValueOrDefault(id);
        }
    }

    public T? Find<T>(string id) where T : class => Find(id) as T;

    /// <summary>A secret's bytes as UTF-8 text (QEMU's qcrypto_secret_lookup_as_utf8), with QEMU's errors.</summary>
    public string LookupSecretAsUtf8(string id)
    {
        var secret = Find(id) switch
        {
            SecretObject s => s,
            null => throw new BlockException($"No secret with id '{id}'"),
            _ => throw new BlockException($"Object with id '{id}' is not a secret"),
        };
        try
        {
            return new System.Text.UTF8Encoding(false, throwOnInvalidBytes: true).GetString(secret.Value);
        }
        catch (System.Text.DecoderFallbackException)
        {
            throw new BlockException($"Data from secret {id} is not valid UTF-8");
        }
    }
}
