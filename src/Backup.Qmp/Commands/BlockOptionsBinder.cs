using System.Text.Json;
using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Qmp.Commands;

/// <summary>Validated JSON → the block layer's neutral option tree.</summary>
public static class BlockOptionsBinder
{
    public static BlockOptions Bind(JsonObject validated)
    {
        ArgumentNullException.ThrowIfNull(validated);
        var o = new BlockOptions();
        foreach (var (k, v) in validated)
        {
            o[k] = Value(v);
        }
        return o;
    }

    private static object? Value(JsonNode? node) => node switch
    {
        null => null,
        JsonObject obj => Bind(obj),
        JsonArray arr => arr.Select(Value).ToList(),
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => v.GetValue<string>(),
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            JsonValueKind.Number when v.TryGetValue<long>(out var l) => l,
            JsonValueKind.Number when v.TryGetValue<ulong>(out var u) => u,
            JsonValueKind.Number => v.GetValue<double>(),
            _ => null,
        },
        _ => null,
    };
}
