using System.Text.Json.Nodes;

namespace Backup.Qmp.Schema;

/// <summary>A type of the protocol schema. Instances are immutable once the loader has resolved them.</summary>
public abstract class SchemaType(string name, string? doc)
{
    public string Name { get; } = name;

    public string? Doc { get; } = doc;

    /// <summary>The word QEMU puts in "Invalid parameter type for 'x', expected: ..." for this type.</summary>
    public abstract string JsonKind { get; }
}

/// <summary>Built-in scalar types: str, bool, number, null, any and the sized integers.</summary>
public sealed class BuiltinType : SchemaType
{
    private BuiltinType(string name, string jsonKind, long? min = null, ulong? max = null, string? cName = null)
        : base(name, null)
    {
        JsonKind = jsonKind;
        Min = min;
        Max = max;
        CName = cName;
    }

    public override string JsonKind { get; }

    /// <summary>Range of an integer type; null bounds mean the full 64-bit range of its signedness.</summary>
    public long? Min { get; }

    public ulong? Max { get; }

    /// <summary>The C type QEMU names in range errors ("Parameter 'x' expects uint32_t").</summary>
    public string? CName { get; }

    public bool IsInteger => JsonKind == "integer";

    /// <summary>uint64 and size are parsed by QEMU's unsigned path, which has its own wording.</summary>
    public bool IsUnsigned64 => Name is "uint64" or "size";

    public static IReadOnlyDictionary<string, BuiltinType> All { get; } = new Dictionary<string, BuiltinType>
    {
        ["str"] = new("str", "string"),
        ["bool"] = new("bool", "boolean"),
        ["number"] = new("number", "number"),
        ["null"] = new("null", "null"),
        ["any"] = new("any", "value"),
        ["int"] = new("int", "integer"),
        ["int8"] = new("int8", "integer", sbyte.MinValue, (ulong)sbyte.MaxValue, "int8_t"),
        ["int16"] = new("int16", "integer", short.MinValue, (ulong)short.MaxValue, "int16_t"),
        ["int32"] = new("int32", "integer", int.MinValue, int.MaxValue, "int32_t"),
        ["int64"] = new("int64", "integer"),
        ["uint8"] = new("uint8", "integer", 0, byte.MaxValue, "uint8_t"),
        ["uint16"] = new("uint16", "integer", 0, ushort.MaxValue, "uint16_t"),
        ["uint32"] = new("uint32", "integer", 0, uint.MaxValue, "uint32_t"),
        ["uint64"] = new("uint64", "integer", 0),
        ["size"] = new("size", "integer", 0),
    };
}

public sealed class EnumType(string name, string? doc, IReadOnlyList<string> values) : SchemaType(name, doc)
{
    public IReadOnlyList<string> Values { get; } = values;

    public override string JsonKind => "string";
}

public sealed class ArrayType(SchemaType element) : SchemaType("[" + element.Name + "]", null)
{
    public SchemaType Element { get; } = element;

    public override string JsonKind => "array";
}

public sealed record SchemaMember(string Name, SchemaType Type, bool Optional, string? Doc);

/// <summary>A JSON object with fixed members (base members first, as QEMU visits them).</summary>
public class StructType(string name, string? doc) : SchemaType(name, doc)
{
    public IReadOnlyList<SchemaMember> Members { get; internal set; } = [];

    public override string JsonKind => "object";

    public SchemaMember? Find(string memberName)
    {
        foreach (var m in Members)
        {
            if (m.Name == memberName)
            {
                return m;
            }
        }
        return null;
    }
}

/// <summary>A struct whose remaining members depend on the value of its enum-typed discriminator.</summary>
public sealed class UnionType(string name, string? doc) : StructType(name, doc)
{
    public string Discriminator { get; internal set; } = "";

    public IReadOnlyDictionary<string, StructType> Variants { get; internal set; } = new Dictionary<string, StructType>();
}

/// <summary>One of several types, chosen by the JSON type of the value.</summary>
public sealed class AlternateType(string name, string? doc) : SchemaType(name, doc)
{
    public IReadOnlyList<(string Tag, SchemaType Type)> Variants { get; internal set; } = [];

    public override string JsonKind => Name;
}

public sealed record SchemaExample(JsonNode Request, JsonNode Reply);

public sealed record CommandDef(
    string Name,
    string Module,
    StructType Arguments,
    bool Boxed,
    SchemaType? Returns,
    string Doc,
    string? Since,
    IReadOnlyList<string> Errors,
    IReadOnlyList<SchemaExample> Examples,
    bool AllowPreconfig = false);

public sealed record EventDef(string Name, string Module, StructType Data, string Doc, string? Since);

/// <summary>Everything schemas/ declares, resolved: the one description of the protocol.</summary>
public sealed class SchemaModel
{
    internal SchemaModel(IReadOnlyList<SchemaModule> modules, IReadOnlyDictionary<string, SchemaType> types,
        IReadOnlyDictionary<string, CommandDef> commands, IReadOnlyDictionary<string, EventDef> events)
    {
        Modules = modules;
        Types = types;
        Commands = commands;
        Events = events;
    }

    public IReadOnlyList<SchemaModule> Modules { get; }

    public IReadOnlyDictionary<string, SchemaType> Types { get; }

    public IReadOnlyDictionary<string, CommandDef> Commands { get; }

    public IReadOnlyDictionary<string, EventDef> Events { get; }
}

public sealed record SchemaModule(string Name, string Doc, IReadOnlyList<string> Definitions);
