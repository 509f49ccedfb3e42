namespace Backup.Block.Drivers.Blkdebug;

/// <summary>
/// QEMU's blkdebug config file (the format of qemu_config_parse): <c>[inject-error]</c> and
/// <c>[set-state]</c> sections, each a group of <c>key = "value"</c> lines; lines starting with '#'
/// and empty lines are skipped. Parsing follows QEMU's sscanf patterns, so the same odd inputs give
/// the same errors: a line whose first word is not followed by <c>= "value"</c> sets that word to "",
/// and a line of blanks is a "parse error".
/// </summary>
internal static class BlkdebugConfigFile
{
    /// <summary>The options of one section, keys as written.</summary>
    internal sealed record Section(string Group, IReadOnlyList<KeyValuePair<string, string>> Values);

    private static readonly string[] InjectErrorKeys = ["event", "state", "iotype", "errno", "sector", "once", "immediately"];
    private static readonly string[] SetStateKeys = ["event", "state", "new_state"];

    public static IReadOnlyList<Section> Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var sections = new List<Section>();
        List<KeyValuePair<string, string>>? current = null;
        string[]? keys = null;
        foreach (var raw in text.Split('\n'))
        {
            var line = raw.TrimEnd('\r');
            if (line.Length == 0 || line[0] == '#')
            {
                continue;
            }
            if (line[0] == '[' && TryGroup(line, out var group))
            {
                keys = group switch
                {
                    "inject-error" => InjectErrorKeys,
                    "set-state" => SetStateKeys,
                    _ => throw new BlockException($"There is no option group '{group}'"),
                };
                current = [];
                sections.Add(new Section(group, current));
                continue;
            }
            var body = line.AsSpan().TrimStart(" \t\v\f");
            if (body.IsEmpty)
            {
                throw new BlockException("parse error");
            }
            var end = body.IndexOfAny(" \t\v\f");
            var key = (end < 0 ? body : body[..end]).ToString();
            if (key.Length > 63)
            {
                key = key[..63];
            }
            var value = ParseValue(end < 0 ? [] : body[end..]);
            if (current is null || keys is null)
            {
                throw new BlockException("no group defined");
            }
            if (Array.IndexOf(keys, key) < 0)
            {
                throw new BlockException($"Invalid parameter '{key}'");
            }
            current.Add(new(key, value));
        }
        return sections;
    }

    /// <summary><c>[name]</c> or <c>[name "id"]</c>; QEMU ignores the id for blkdebug's groups.</summary>
    private static bool TryGroup(string line, out string group)
    {
        group = "";
        var close = line.IndexOf(']', 1);
        if (close <= 1)
        {
            return false;
        }
        var inner = line[1..close];
        var space = inner.IndexOfAny([' ', '\t']);
        group = space < 0 ? inner : inner[..space];
        return group.Length > 0;
    }

    /// <summary>What follows the key: <c> = "value"</c>, else "" (QEMU's second sscanf pattern).</summary>
    private static string ParseValue(ReadOnlySpan<char> rest)
    {
        rest = rest.TrimStart(" \t\v\f");
        if (rest.IsEmpty || rest[0] != '=')
        {
            return "";
        }
        rest = rest[1..].TrimStart(" \t\v\f");
        if (rest.IsEmpty || rest[0] != '"')
        {
            return "";
        }
        rest = rest[1..];
        var close = rest.IndexOf('"');
        return close <= 0 ? "" : rest[..Math.Min(close, 1023)].ToString();
    }
}
