using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Qmp.Schema;

/// <summary>Where input comes from: QMP JSON (typed) or the command line's key=value form (every leaf a string).</summary>
public enum InputForm
{
    Json,
    KeyValue,
}

/// <summary>
/// Checks input against a schema type the way QEMU's QAPI input visitors do (members in declaration
/// order, unexpected members last) and returns a typed copy. Errors carry QEMU's wording and the
/// member's full path ('file.filename', 'bitmaps[0]'). Nothing acts on input before this passes.
/// </summary>
public static class InputValidator
{
    public static JsonObject ValidateArguments(JsonObject? arguments, StructType type, InputForm form = InputForm.Json)
    {
        ArgumentNullException.ThrowIfNull(type);
        return (JsonObject)Validate(arguments ?? [], type, null, form)!;
    }

    public static JsonNode? Validate(JsonNode? input, SchemaType type, string? path, InputForm form)
    {
        ArgumentNullException.ThrowIfNull(type);
        return type switch
        {
            BuiltinType b => Builtin(input, b, path, form),
            EnumType e => Enum(input, e, path),
            ArrayType a => Array(input, a, path, form),
            UnionType u => Union(input, u, path, form),
            StructType s => Struct(input, s, path, form),
            AlternateType alt => Alternate(input, alt, path, form),
            _ => throw new InvalidOperationException($"unhandled schema type {type.GetType().Name}"),
        };
    }

    /// <summary>QEMU names a list element itself 'null' (its members get 'list[i].member').</summary>
    private static string Name(string? path) => path ?? "null";

    /// <summary>QEMU 7.2 names a member by its full path: 'actions[0].data.name', 'rules[0].policy'.</summary>
    private static string Child(string? path, string member) => path is null ? member : path + "." + member;

    private static BlockException TypeError(string? path, string expected) =>
        new($"Invalid parameter type for '{Name(path)}', expected: {expected}");

    private static JsonObject Struct(JsonNode? input, StructType type, string? path, InputForm form)
    {
        if (input is not JsonObject obj)
        {
            throw TypeError(path, "object");
        }
        var result = new JsonObject();
        VisitMembers(obj, type.Members, result, path, form);
        CheckUnexpected(obj, result, path);
        return result;
    }

    private static JsonObject Union(JsonNode? input, UnionType type, string? path, InputForm form)
    {
        if (input is not JsonObject obj)
        {
            throw TypeError(path, "object");
        }
        var result = new JsonObject();
        VisitMembers(obj, type.Members, result, path, form);
        var tag = result[type.Discriminator]!.GetValue<string>();
        if (type.Variants.TryGetValue(tag, out var variant))
        {
            VisitMembers(obj, variant.Members.Where(m => type.Find(m.Name) is null), result, path, form);
        }
        CheckUnexpected(obj, result, path);
        return result;
    }

    private static void VisitMembers(JsonObject obj, IEnumerable<SchemaMember> members, JsonObject result, string? path, InputForm form)
    {
        foreach (var m in members)
        {
            if (!obj.TryGetPropertyValue(m.Name, out var value))
            {
                if (!m.Optional)
                {
                    throw new BlockException($"Parameter '{Child(path, m.Name)}' is missing");
                }
                continue;
            }
            result[m.Name] = Validate(value, m.Type, Child(path, m.Name), form);
        }
    }

    private static void CheckUnexpected(JsonObject obj, JsonObject visited, string? path)
    {
        foreach (var (key, _) in obj)
        {
            if (!visited.ContainsKey(key))
            {
                throw new BlockException($"Parameter '{Child(path, key)}' is unexpected");
            }
        }
    }

    private static JsonArray Array(JsonNode? input, ArrayType type, string? path, InputForm form)
    {
        var items = input switch
        {
            JsonArray a => a.ToList(),
            // key=value lists are written as a.0=..., a.1=...: an object with index keys.
            JsonObject o when form == InputForm.KeyValue && o.All(kv => int.TryParse(kv.Key, NumberStyles.None, CultureInfo.InvariantCulture, out _)) =>
                o.OrderBy(kv => int.Parse(kv.Key, CultureInfo.InvariantCulture)).Select(kv => kv.Value).ToList(),
            _ => throw TypeError(path, "array"),
        };
        var result = new JsonArray();
        for (var i = 0; i < items.Count; i++)
        {
            result.Add(Validate(items[i], type.Element, $"{Name(path)}[{i}]", form));
        }
        return result;
    }

    private static JsonValue Enum(JsonNode? input, EnumType type, string? path)
    {
        if (input is not JsonValue v || v.GetValueKind() != JsonValueKind.String)
        {
            throw TypeError(path, "string");
        }
        var s = v.GetValue<string>();
        if (!type.Values.Contains(s))
        {
            // QEMU names the member alone here, however deep it is ('completion-mode', not
            // 'properties.completion-mode'): its enum visitor is not given the full path.
            var name = Name(path);
            throw new BlockException($"Parameter '{name[(name.LastIndexOf('.') + 1)..]}' does not accept value '{s}'");
        }
        return JsonValue.Create(s);
    }

    private static JsonNode? Alternate(JsonNode? input, AlternateType type, string? path, InputForm form)
    {
        var kind = input switch
        {
            null => "null",
            JsonObject => "object",
            JsonArray => "array",
            JsonValue v => v.GetValueKind() switch
            {
                JsonValueKind.String => "string",
                JsonValueKind.Number => "number",
                JsonValueKind.True or JsonValueKind.False => "boolean",
                _ => "null",
            },
            _ => "value",
        };
        foreach (var (_, t) in type.Variants)
        {
            var accepts = t switch
            {
                StructType => kind == "object",
                EnumType => kind == "string",
                ArrayType => kind == "array",
                BuiltinType { Name: "str" } => kind == "string",
                BuiltinType { Name: "null" } => kind == "null",
                BuiltinType { Name: "bool" } => kind == "boolean" || (form == InputForm.KeyValue && kind == "string"),
                BuiltinType b when b.IsInteger || b.Name == "number" => kind == "number",
                _ => false,
            };
            if (accepts)
            {
                return Validate(input, t, path, form);
            }
        }
        // QEMU visits an alternate inside a list without a name: 'null', not 'bitmaps[0]'.
        throw TypeError(path is not null && path.EndsWith(']') ? null : path, type.Name);
    }

    private static JsonNode? Builtin(JsonNode? input, BuiltinType type, string? path, InputForm form)
    {
        if (type.Name == "any")
        {
            return input?.DeepClone();
        }
        if (type.Name == "null")
        {
            return input is null ? null : throw TypeError(path, "null");
        }
        if (form == InputForm.KeyValue && input is JsonValue kv && kv.GetValueKind() == JsonValueKind.String)
        {
            return KeyValueScalar(kv.GetValue<string>(), type, path);
        }
        var valueKind = (input as JsonValue)?.GetValueKind();
        switch (type.Name)
        {
            case "str":
                return valueKind == JsonValueKind.String ? JsonValue.Create(input!.GetValue<string>()) : throw TypeError(path, "string");
            case "bool":
                return valueKind is JsonValueKind.True or JsonValueKind.False ? JsonValue.Create(input!.GetValue<bool>()) : throw TypeError(path, "boolean");
            case "number":
                return valueKind == JsonValueKind.Number ? JsonValue.Create(input!.GetValue<double>()) : throw TypeError(path, "number");
        }
        return Integer((JsonValue?)(valueKind == JsonValueKind.Number ? input : null), type, path);
    }

    /// <summary>
    /// QEMU's integer rules: a signed type takes any JSON integer that fits int64 and says "expected:
    /// integer" otherwise; uint64/size take what fits uint64, and (for compatibility) negative int64,
    /// and say "expects uint64"; narrower types then check their range ("expects uint32_t").
    /// </summary>
    private static JsonValue Integer(JsonValue? number, BuiltinType type, string? path)
    {
        var unsigned = type.Min == 0;
        if (unsigned)
        {
            ulong u;
            if (number is not null && number.TryGetValue<ulong>(out var pu))
            {
                u = pu;
            }
            else if (number is not null && number.TryGetValue<long>(out var neg))
            {
                u = unchecked((ulong)neg);
            }
            else
            {
                throw new BlockException($"Parameter '{Name(path)}' expects {(type.Name == "size" ? "size" : "uint64")}");
            }
            if (type.Max is { } max && u > max)
            {
                throw new BlockException($"Parameter '{Name(path)}' expects {type.CName}");
            }
            return u <= long.MaxValue ? JsonValue.Create((long)u) : JsonValue.Create(u);
        }
        if (number is null || !number.TryGetValue<long>(out var l))
        {
            throw TypeError(path, "integer");
        }
        if ((type.Min is { } min && l < min) || (type.Max is { } smax && l > (long)smax))
        {
            throw new BlockException($"Parameter '{Name(path)}' expects {type.CName}");
        }
        return JsonValue.Create(l);
    }

    /// <summary>The command line's typed reading of a string (QEMU's keyval input visitor).</summary>
    private static JsonValue KeyValueScalar(string s, BuiltinType type, string? path)
    {
        switch (type.Name)
        {
            case "str":
                return JsonValue.Create(s);
            case "bool":
                return s switch
                {
                    "on" or "yes" or "true" or "y" => JsonValue.Create(true),
                    "off" or "no" or "false" or "n" => JsonValue.Create(false),
                    _ => throw new BlockException($"Parameter '{Name(path)}' expects 'on' or 'off'"),
                };
            case "number":
                return double.TryParse(s, NumberStyles.Float, CultureInfo.InvariantCulture, out var d)
                    ? JsonValue.Create(d)
                    : throw new BlockException($"Parameter '{Name(path)}' expects a number");
        }
        if (type.Name == "size")
        {
            return JsonValue.Create(ParseSize(s) ?? throw new BlockException(
                $"Parameter '{Name(path)}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."));
        }
        var parsed = s.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
            ? long.TryParse(s.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var hex) ? hex : (long?)null
            : long.TryParse(s, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var dec) ? dec : null;
        if (parsed is null)
        {
            throw new BlockException($"Parameter '{Name(path)}' expects {(type.Min == 0 ? "uint64" : "integer")}");
        }
        return Integer(JsonValue.Create(parsed.Value), type, path);
    }

    private static long? ParseSize(string s)
    {
        if (s.Length == 0)
        {
            return null;
        }
        var shift = char.ToUpperInvariant(s[^1]) switch
        {
            'K' => 10,
            'M' => 20,
            'G' => 30,
            'T' => 40,
            'P' => 50,
            'E' => 60,
            'B' => 0,
            _ => -1,
        };
        var digits = shift >= 0 ? s[..^1] : s;
        if (!decimal.TryParse(digits, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out var value))
        {
            return null;
        }
        var bytes = value * (1L << Math.Max(shift, 0));
        return bytes is >= 0 and <= long.MaxValue ? (long)bytes : null;
    }
}
