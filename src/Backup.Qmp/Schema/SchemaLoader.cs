using System.Reflection;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Backup.Qmp.Schema;

/// <summary>
/// Reads the QAPI-shaped JSON of schemas/ (compiled into this assembly) into a <see cref="SchemaModel"/>.
/// An invalid schema is a build defect: it throws, and the daemon does not start.
/// </summary>
public static class SchemaLoader
{
    private static readonly Lazy<SchemaModel> Embedded = new(() => Load(ReadEmbedded()));

    /// <summary>The schema compiled into the daemon.</summary>
    public static SchemaModel Default => Embedded.Value;

    public static IEnumerable<(string Name, string Json)> ReadEmbedded()
    {
        var asm = typeof(SchemaLoader).Assembly;
        foreach (var name in asm.GetManifestResourceNames().Where(n => n.StartsWith("schemas/", StringComparison.Ordinal)).Order(StringComparer.Ordinal))
        {
            using var s = asm.GetManifestResourceStream(name)!;
            using var r = new StreamReader(s);
            yield return (name, r.ReadToEnd());
        }
    }

    public static SchemaModel Load(IEnumerable<(string Name, string Json)> files)
    {
        var raw = new List<(string Module, JsonObject Def)>();
        var modules = new List<SchemaModule>();
        foreach (var (fileName, json) in files)
        {
            var root = JsonNode.Parse(json, documentOptions: new JsonDocumentOptions { CommentHandling = JsonCommentHandling.Disallow })?.AsObject()
                ?? throw new InvalidDataException($"{fileName}: not a JSON object");
            var module = Str(root, "module", fileName);
            var names = new List<string>();
            foreach (var d in root["definitions"]?.AsArray() ?? throw new InvalidDataException($"{fileName}: no definitions"))
            {
                var def = d!.AsObject();
                raw.Add((module, def));
                names.Add(DefinitionName(def, fileName));
            }
            modules.Add(new SchemaModule(module, Str(root, "doc", fileName), names));
        }
        return new Resolver(raw, modules).Resolve();
    }

    private static string DefinitionName(JsonObject def, string where)
    {
        foreach (var kind in new[] { "command", "struct", "enum", "union", "alternate", "event" })
        {
            if (def[kind] is JsonValue v)
            {
                return v.GetValue<string>();
            }
        }
        throw new InvalidDataException($"{where}: definition without a kind: {def.ToJsonString()}");
    }

    private static string Str(JsonObject o, string key, string where) =>
        o[key]?.GetValue<string>() ?? throw new InvalidDataException($"{where}: missing '{key}'");

    private sealed class Resolver(List<(string Module, JsonObject Def)> raw, List<SchemaModule> modules)
    {
        private readonly Dictionary<string, SchemaType> _types = new(StringComparer.Ordinal);
        private readonly Dictionary<string, (string Module, JsonObject Def)> _pending = new(StringComparer.Ordinal);
        private readonly Dictionary<string, ArrayType> _arrays = new(StringComparer.Ordinal);
        private readonly HashSet<string> _resolving = new(StringComparer.Ordinal);

        public SchemaModel Resolve()
        {
            foreach (var (name, t) in BuiltinType.All)
            {
                _types[name] = t;
            }
            foreach (var (module, def) in raw)
            {
                if (def["command"] is null && def["event"] is null)
                {
                    var name = DefinitionName(def, module);
                    if (!_pending.TryAdd(name, (module, def)) || _types.ContainsKey(name))
                    {
                        throw new InvalidDataException($"{module}: type '{name}' declared twice");
                    }
                }
            }
            foreach (var name in _pending.Keys.ToList())
            {
                Type(name);
            }
            var commands = new Dictionary<string, CommandDef>(StringComparer.Ordinal);
            var events = new Dictionary<string, EventDef>(StringComparer.Ordinal);
            foreach (var (module, def) in raw)
            {
                if (def["command"] is JsonValue c)
                {
                    var cmd = Command(module, c.GetValue<string>(), def);
                    if (!commands.TryAdd(cmd.Name, cmd))
                    {
                        throw new InvalidDataException($"command '{cmd.Name}' declared twice");
                    }
                }
                else if (def["event"] is JsonValue e)
                {
                    var name = e.GetValue<string>();
                    var data = AnonymousStruct(name, def["data"]);
                    if (!events.TryAdd(name, new EventDef(name, module, data, Doc(def, name), def["since"]?.GetValue<string>())))
                    {
                        throw new InvalidDataException($"event '{name}' declared twice");
                    }
                }
            }
            return new SchemaModel(modules, _types, commands, events);
        }

        private CommandDef Command(string module, string name, JsonObject def)
        {
            var boxed = def["boxed"]?.GetValue<bool>() ?? false;
            StructType args;
            if (def["data"] is JsonValue typeName)
            {
                args = Type(typeName.GetValue<string>()) as StructType
                    ?? throw new InvalidDataException($"command '{name}': data must name a struct or union");
            }
            else
            {
                args = AnonymousStruct(name, def["data"]);
            }
            var returns = def["returns"] is { } r ? TypeRef(r, name) : null;
            var errors = def["errors"]?.AsArray().Select(e => e!.GetValue<string>()).ToList() ?? [];
            var examples = def["examples"]?.AsArray().Select(e => new SchemaExample(
                e!["request"]!.DeepClone(), e["reply"]!.DeepClone())).ToList() ?? [];
            return new CommandDef(name, module, args, boxed, returns, Doc(def, name), def["since"]?.GetValue<string>(), errors, examples);
        }

        private static string Doc(JsonObject def, string name) =>
            def["doc"]?.GetValue<string>() ?? throw new InvalidDataException($"'{name}' has no doc");

        private StructType AnonymousStruct(string owner, JsonNode? data)
        {
            var s = new StructType(owner + "-arg", null);
            s.Members = data is JsonObject o ? Members(o, owner) : [];
            return s;
        }

        private SchemaType Type(string name)
        {
            if (_types.TryGetValue(name, out var t))
            {
                return t;
            }
            if (!_pending.TryGetValue(name, out var p))
            {
                throw new InvalidDataException($"unknown type '{name}'");
            }
            if (!_resolving.Add(name))
            {
                throw new InvalidDataException($"type '{name}' is defined in terms of itself");
            }
            var def = p.Def;
            var doc = def["doc"]?.GetValue<string>();
            if (def["enum"] is not null)
            {
                var values = def["data"]!.AsArray().Select(v => v!.GetValue<string>()).ToList();
                t = new EnumType(name, doc, values);
                _types[name] = t;
            }
            else if (def["struct"] is not null)
            {
                var s = new StructType(name, doc);
                _types[name] = s; // registered before members, so members may refer back (e.g. ImageInfo.backing-image)
                var members = new List<SchemaMember>();
                if (def["base"] is JsonValue b)
                {
                    members.AddRange(((StructType)Type(b.GetValue<string>())).Members);
                }
                members.AddRange(Members(def["data"]!.AsObject(), name));
                s.Members = members;
                t = s;
            }
            else if (def["union"] is not null)
            {
                var u = new UnionType(name, doc);
                _types[name] = u;
                u.Members = def["base"] is JsonValue bn ? ((StructType)Type(bn.GetValue<string>())).Members : Members(def["base"]!.AsObject(), name);
                u.Discriminator = def["discriminator"]!.GetValue<string>();
                var tagType = u.Find(u.Discriminator)?.Type as EnumType
                    ?? throw new InvalidDataException($"union '{name}': discriminator must be an enum member of the base");
                var variants = new Dictionary<string, StructType>(StringComparer.Ordinal);
                foreach (var (tag, vt) in def["data"]!.AsObject())
                {
                    if (!tagType.Values.Contains(tag))
                    {
                        throw new InvalidDataException($"union '{name}': '{tag}' is not a value of {tagType.Name}");
                    }
                    variants[tag] = (StructType)Type(vt!.GetValue<string>());
                }
                u.Variants = variants;
                t = u;
            }
            else if (def["alternate"] is not null)
            {
                var a = new AlternateType(name, doc);
                _types[name] = a;
                a.Variants = def["data"]!.AsObject().Select(kv => (kv.Key, Type(kv.Value!.GetValue<string>()))).ToList();
                t = a;
            }
            else
            {
                throw new InvalidDataException($"'{name}': unknown definition kind");
            }
            _resolving.Remove(name);
            return t;
        }

        private List<SchemaMember> Members(JsonObject data, string owner)
        {
            var list = new List<SchemaMember>();
            foreach (var (key, value) in data)
            {
                var optional = key.StartsWith('*');
                var name = optional ? key[1..] : key;
                string? doc = null;
                var typeNode = value;
                if (value is JsonObject mo)
                {
                    typeNode = mo["type"];
                    doc = mo["doc"]?.GetValue<string>();
                }
                list.Add(new SchemaMember(name, TypeRef(typeNode!, owner + "." + name), optional, doc));
            }
            return list;
        }

        private SchemaType TypeRef(JsonNode node, string where)
        {
            switch (node)
            {
                case JsonValue v:
                    return Type(v.GetValue<string>());
                case JsonArray { Count: 1 } a:
                    var element = TypeRef(a[0]!, where);
                    if (!_arrays.TryGetValue(element.Name, out var arr))
                    {
                        arr = new ArrayType(element);
                        _arrays[element.Name] = arr;
                    }
                    return arr;
                default:
                    throw new InvalidDataException($"{where}: bad type reference {node.ToJsonString()}");
            }
        }
    }

    /// <summary>Embedded resource names, for tests that compare the schema with the files in the repository.</summary>
    public static IReadOnlyList<string> EmbeddedNames() =>
        typeof(SchemaLoader).Assembly.GetManifestResourceNames().Where(n => n.StartsWith("schemas/", StringComparison.Ordinal)).ToList();

    internal static Assembly Assembly => typeof(SchemaLoader).Assembly;
}
