using System.Collections;

namespace Backup.Block;

/// <summary>
/// The options of one node as a tree of already-validated values (QEMU's QDict): strings, 64-bit
/// integers, booleans, nested <see cref="BlockOptions"/>, lists and null. The protocol layer checks
/// types against the schema before a driver sees them, so drivers read with typed getters.
/// </summary>
public sealed class BlockOptions : IEnumerable<KeyValuePair<string, object?>>
{
    private readonly Dictionary<string, object?> _values = new(StringComparer.Ordinal);

    public BlockOptions() { }

    public BlockOptions(IEnumerable<KeyValuePair<string, object?>> values)
    {
        foreach (var (k, v) in values)
        {
            _values[k] = v;
        }
    }

    public object? this[string key]
    {
        get => _values.TryGetValue(key, out var v) ? v : null;
        set => _values[key] = value;
    }

    public bool Contains(string key) => _values.ContainsKey(key);

    public string Driver => GetString("driver") ?? throw new BlockException("Parameter 'driver' is missing");

    public string? NodeName => GetString("node-name");

    public string? GetString(string key) => this[key] as string;

    public long? GetInt64(string key) => this[key] switch
    {
        long l => l,
        int i => i,
        ulong u => checked((long)u),
        _ => null,
    };

    public bool? GetBool(string key) => this[key] as bool?;

    public BlockOptions? GetDict(string key) => this[key] as BlockOptions;

    /// <summary>A child given either by reference (a node name) or inline (nested options), or explicitly null.</summary>
    public bool IsExplicitNull(string key) => _values.TryGetValue(key, out var v) && v is null;

    public IEnumerator<KeyValuePair<string, object?>> GetEnumerator() => _values.GetEnumerator();

    IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();
}
