using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Backup.Qmp.Schema;

/// <summary>
/// Renders docs/protocol.md from the schema, so the reference cannot drift from what the daemon
/// accepts: a test regenerates it and fails on any difference.
/// </summary>
public static class ProtocolDoc
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static string Render(SchemaModel schema)
    {
        ArgumentNullException.ThrowIfNull(schema);
        var sb = new StringBuilder();
        sb.AppendLine("# backupd QMP reference");
        sb.AppendLine();
        sb.AppendLine("Generated from `schemas/*.json` by `ProtocolDoc` (a test fails when this file and the schema disagree;");
        sb.AppendLine("run the tests with `BACKUPD_UPDATE_DOCS=1` to rewrite it). Wire rules follow QEMU's QMP specification:");
        sb.AppendLine("see docs/architecture.md for framing, limits and the deviations from qemu-storage-daemon 7.2.");
        sb.AppendLine();
        foreach (var module in schema.Modules)
        {
            sb.AppendLine($"## {module.Name}");
            sb.AppendLine();
            sb.AppendLine(module.Doc);
            sb.AppendLine();
            foreach (var c in schema.Commands.Values.Where(c => c.Module == module.Name).OrderBy(c => c.Name, StringComparer.Ordinal))
            {
                sb.AppendLine($"### `{c.Name}`");
                sb.AppendLine();
                sb.AppendLine(c.Doc);
                sb.AppendLine();
                if (c.Boxed)
                {
                    sb.AppendLine($"Arguments: the members of `{c.Arguments.Name}`.");
                    sb.AppendLine();
                }
                else
                {
                    Members(sb, c.Arguments.Members, "Arguments");
                }
                sb.AppendLine($"Returns: {(c.Returns is null ? "`{}`" : $"`{c.Returns.Name}`")}");
                sb.AppendLine();
                foreach (var e in c.Errors)
                {
                    sb.AppendLine($"- Error: {e}");
                }
                if (c.Errors.Count > 0)
                {
                    sb.AppendLine();
                }
                foreach (var ex in c.Examples)
                {
                    sb.AppendLine("```");
                    sb.AppendLine("-> " + ex.Request.ToJsonString());
                    sb.AppendLine("<- " + ex.Reply.ToJsonString());
                    sb.AppendLine("```");
                    sb.AppendLine();
                }
            }
            foreach (var ev in schema.Events.Values.Where(e => e.Module == module.Name).OrderBy(e => e.Name, StringComparer.Ordinal))
            {
                sb.AppendLine($"### Event `{ev.Name}`");
                sb.AppendLine();
                sb.AppendLine(ev.Doc);
                sb.AppendLine();
                Members(sb, ev.Data.Members, "Data");
            }
            var types = module.Definitions.Select(d => schema.Types.GetValueOrDefault(d)).OfType<SchemaType>().ToList();
            if (types.Count > 0)
            {
                sb.AppendLine($"### Types of {module.Name}");
                sb.AppendLine();
                foreach (var t in types)
                {
                    Type(sb, t);
                }
            }
        }
        return sb.ToString();
    }

    private static void Type(StringBuilder sb, SchemaType t)
    {
        sb.AppendLine($"#### `{t.Name}`");
        sb.AppendLine();
        if (t.Doc is not null)
        {
            sb.AppendLine(t.Doc);
            sb.AppendLine();
        }
        switch (t)
        {
            case EnumType e:
                sb.AppendLine("Values: " + string.Join(", ", e.Values.Select(v => $"`{v}`")));
                sb.AppendLine();
                break;
            case AlternateType a:
                sb.AppendLine("One of: " + string.Join(", ", a.Variants.Select(v => $"`{v.Type.Name}` ({v.Tag})")));
                sb.AppendLine();
                break;
            case UnionType u:
                Members(sb, u.Members, "Common members");
                sb.AppendLine($"Discriminator `{u.Discriminator}`: " + string.Join(", ", u.Variants.Select(v => $"`{v.Key}` → `{v.Value.Name}`")));
                sb.AppendLine();
                break;
            case StructType s:
                Members(sb, s.Members, "Members");
                break;
        }
    }

    private static void Members(StringBuilder sb, IReadOnlyList<SchemaMember> members, string title)
    {
        if (members.Count == 0)
        {
            sb.AppendLine($"{title}: none.");
            sb.AppendLine();
            return;
        }
        sb.AppendLine($"{title}:");
        sb.AppendLine();
        sb.AppendLine("| name | type | optional | description |");
        sb.AppendLine("| --- | --- | --- | --- |");
        foreach (var m in members)
        {
            sb.AppendLine($"| `{m.Name}` | `{m.Type.Name}` | {(m.Optional ? "yes" : "no")} | {m.Doc ?? ""} |");
        }
        sb.AppendLine();
    }

    /// <summary>Pretty JSON, for examples in other docs.</summary>
    public static string Pretty(JsonNode node) => node?.ToJsonString(Indented) ?? "null";
}
