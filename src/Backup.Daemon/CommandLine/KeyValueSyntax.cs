using System.Text;
using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Daemon.CommandLine;

/// <summary>
/// QEMU's key=value option syntax: <c>a=1,b.c=2</c> with dotted keys for nesting, <c>,,</c> for a
/// literal comma, and an implied key for a leading bare value (<c>--blockdev raw,...</c> means
/// <c>driver=raw</c>). Values stay strings; the schema gives them their types afterwards. An argument
/// that starts with '{' is JSON instead, as in QEMU.
/// </summary>
public static class KeyValueSyntax
{
    public static bool IsJson(string text) => text.TrimStart().StartsWith('{');

    public static JsonObject Parse(string text, string? impliedKey)
    {
        ArgumentNullException.ThrowIfNull(text);
        var root = new JsonObject();
        var i = 0;
        var first = true;
        while (i < text.Length)
        {
            var key = ReadUntil(text, ref i, stopAtEquals: true, out var sawEquals);
            string value;
            if (sawEquals)
            {
                value = ReadUntil(text, ref i, stopAtEquals: false, out _);
            }
            else if (first && impliedKey is not null)
            {
                value = key;
                key = impliedKey;
            }
            else
            {
                throw new BlockException(key.Length == 0 ? "Invalid parameter ''" : $"Expected '=' after parameter '{key}'");
            }
            first = false;
            Set(root, key, value);
        }
        return root;
    }

    private static string ReadUntil(string text, ref int i, bool stopAtEquals, out bool sawEquals)
    {
        var sb = new StringBuilder();
        sawEquals = false;
        while (i < text.Length)
        {
            var c = text[i];
            if (c == ',')
            {
                if (!stopAtEquals && i + 1 < text.Length && text[i + 1] == ',')
                {
                    sb.Append(',');
                    i += 2;
                    continue;
                }
                i++;
                return sb.ToString();
            }
            if (stopAtEquals && c == '=')
            {
                sawEquals = true;
                i++;
                return sb.ToString();
            }
            sb.Append(c);
            i++;
        }
        return sb.ToString();
    }

    private static void Set(JsonObject root, string key, string value)
    {
        var parts = key.Split('.');
        if (parts.Any(p => p.Length == 0))
        {
            throw new BlockException($"Invalid parameter '{key}'");
        }
        var node = root;
        for (var p = 0; p < parts.Length - 1; p++)
        {
            var existing = node[parts[p]];
            if (existing is null)
            {
                var child = new JsonObject();
                node[parts[p]] = child;
                node = child;
            }
            else if (existing is JsonObject o)
            {
                node = o;
            }
            else
            {
                throw new BlockException($"Parameter '{string.Join('.', parts[..(p + 1)])}' used inconsistently");
            }
        }
        var last = parts[^1];
        if (node[last] is JsonObject)
        {
            throw new BlockException($"Parameter '{key}' used inconsistently");
        }
        node[last] = value;
    }
}
