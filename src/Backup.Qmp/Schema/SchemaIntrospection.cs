using System.Text.Json.Nodes;

namespace Backup.Qmp.Schema;

/// <summary>
/// query-qmp-schema: the schema as QEMU's SchemaInfo list (qapi/introspect.json). Every type a command
/// or event reaches is listed once; argument-less commands use the empty object type "0" as QEMU does.
/// </summary>
public static class SchemaIntrospection
{
    private const string EmptyObject = "0";

    public static JsonArray Build(SchemaModel schema)
    {
        ArgumentNullException.ThrowIfNull(schema);
        var entries = new JsonArray();
        var types = new List<SchemaType>();
        var seen = new HashSet<string>(StringComparer.Ordinal);

        string Ref(SchemaType t)
        {
            if (t is StructType { Members.Count: 0 } and not UnionType)
            {
                seen.Add(EmptyObject);
                return EmptyObject;
            }
            if (seen.Add(t.Name))
            {
                types.Add(t);
            }
            return t.Name;
        }

        foreach (var c in schema.Commands.Values.OrderBy(c => c.Name, StringComparer.Ordinal))
        {
            var e = new JsonObject
            {
                ["name"] = c.Name,
                ["meta-type"] = "command",
                ["arg-type"] = Ref(c.Arguments),
                ["ret-type"] = c.Returns is null ? Ref(new StructType(EmptyObject, null)) : Ref(c.Returns),
            };
            entries.Add((JsonNode)e);
        }
        foreach (var ev in schema.Events.Values.OrderBy(e => e.Name, StringComparer.Ordinal))
        {
            entries.Add((JsonNode)new JsonObject { ["name"] = ev.Name, ["meta-type"] = "event", ["arg-type"] = Ref(ev.Data) });
        }
        for (var i = 0; i < types.Count; i++)
        {
            entries.Add((JsonNode)Describe(types[i], Ref));
        }
        if (seen.Contains(EmptyObject))
        {
            entries.Add((JsonNode)new JsonObject { ["name"] = EmptyObject, ["meta-type"] = "object", ["members"] = new JsonArray() });
        }
        return entries;
    }

    private static JsonObject Describe(SchemaType t, Func<SchemaType, string> typeRef)
    {
        switch (t)
        {
            case BuiltinType b:
                return new JsonObject
                {
                    ["name"] = b.Name,
                    ["meta-type"] = "builtin",
                    ["json-type"] = b.JsonKind switch { "integer" => "int", "boolean" => "boolean", var k => k },
                };
            case EnumType e:
                return new JsonObject
                {
                    ["name"] = e.Name,
                    ["meta-type"] = "enum",
                    ["members"] = new JsonArray(e.Values.Select(v => (JsonNode)new JsonObject { ["name"] = v }).ToArray()),
                    ["values"] = new JsonArray(e.Values.Select(v => (JsonNode)JsonValue.Create(v)).ToArray()),
                };
            case ArrayType a:
                return new JsonObject { ["name"] = a.Name, ["meta-type"] = "array", ["element-type"] = typeRef(a.Element) };
            case AlternateType alt:
                return new JsonObject
                {
                    ["name"] = alt.Name,
                    ["meta-type"] = "alternate",
                    ["members"] = new JsonArray(alt.Variants.Select(v => (JsonNode)new JsonObject { ["type"] = typeRef(v.Type) }).ToArray()),
                };
            case UnionType u:
                var union = Object(u, u.Members, typeRef);
                union["tag"] = u.Discriminator;
                union["variants"] = new JsonArray(u.Variants.Select(v => (JsonNode)new JsonObject
                {
                    ["case"] = v.Key,
                    ["type"] = typeRef(OnlyOwnMembers(u, v.Value)),
                }).ToArray());
                return union;
            case StructType s:
                return Object(s, s.Members, typeRef);
            default:
                throw new InvalidOperationException(t.GetType().Name);
        }
    }

    /// <summary>A variant lists only the members its union's base does not already have.</summary>
    private static StructType OnlyOwnMembers(UnionType u, StructType variant)
    {
        var own = variant.Members.Where(m => u.Find(m.Name) is null).ToList();
        return own.Count == variant.Members.Count ? variant : new StructType(variant.Name, variant.Doc) { Members = own };
    }

    private static JsonObject Object(SchemaType t, IReadOnlyList<SchemaMember> members, Func<SchemaType, string> typeRef)
    {
        var list = new JsonArray();
        foreach (var m in members)
        {
            var mo = new JsonObject { ["name"] = m.Name, ["type"] = typeRef(m.Type) };
            if (m.Optional)
            {
                mo["default"] = null;
            }
            list.Add((JsonNode)mo);
        }
        return new JsonObject { ["name"] = t.Name, ["meta-type"] = "object", ["members"] = list };
    }
}
