using System.Text.Json.Nodes;

namespace Backup.Qmp;

/// <summary>Turns the block layer's neutral values (ordered pairs, lists, scalars) into JSON.</summary>
public static class JsonValues
{
    public static JsonNode? From(object? value) => value switch
    {
        null => null,
        JsonNode n => n.DeepClone(),
        string s => JsonValue.Create(s),
        bool b => JsonValue.Create(b),
        int i => JsonValue.Create(i),
        long l => JsonValue.Create(l),
        ulong u => JsonValue.Create(u),
        uint u => JsonValue.Create(u),
        double d => JsonValue.Create(d),
        IEnumerable<KeyValuePair<string, object?>> pairs => Object(pairs),
        System.Collections.IEnumerable list => new JsonArray(list.Cast<object?>().Select(From).ToArray()),
        Enum e => JsonValue.Create(e.ToString().ToLowerInvariant()),
        _ => throw new ArgumentException($"cannot express {value.GetType().Name} in JSON", nameof(value)),
    };

    private static JsonObject Object(IEnumerable<KeyValuePair<string, object?>> pairs)
    {
        var o = new JsonObject();
        foreach (var (k, v) in pairs)
        {
            o[k] = From(v);
        }
        return o;
    }
}
