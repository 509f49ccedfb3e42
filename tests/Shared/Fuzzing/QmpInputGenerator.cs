using System.Text;

namespace Backup.Tests.Fuzzing;

/// <summary>
/// Seeded QMP input: well-formed requests built from the fuzz schema, and mutations of them (byte flips,
/// cuts, insertions, duplicate members, lone surrogates, deep nesting, long strings, many members). Each
/// call returns one line's bytes without its newline; a mutation may contain newlines of its own.
/// The in-process fuzzer uses its own small schema's names; the black-box one a daemon's real commands,
/// members, and whole requests (<c>templates</c>) that act on its nodes.
/// </summary>
internal sealed class QmpInputGenerator(Random random, string[]? commands = null, string[]? members = null, string[]? templates = null)
{
    private readonly string[] _commands = commands ?? ["t", "query-version", "boom", "qmp_capabilities", "nope", ""];
    private readonly string[] _members = members ?? ["node", "gran", "big", "speed", "flag", "mode", "inner", "list", "bogus"];

    public byte[] Next() => random.Next(4) switch
    {
        0 => Encoding.UTF8.GetBytes(ValidRequest()),
        1 => Special(),
        _ => Mutate(Encoding.UTF8.GetBytes(ValidRequest())),
    };

    public string ValidRequest()
    {
        if (templates is { Length: > 0 } && random.Next(3) == 0)
        {
            return templates[random.Next(templates.Length)];
        }
        var sb = new StringBuilder("{\"execute\": \"").Append(_commands[random.Next(_commands.Length)]).Append('"');
        if (random.Next(3) > 0)
        {
            sb.Append(", \"arguments\": {");
            var n = random.Next(5);
            for (var i = 0; i < n; i++)
            {
                sb.Append(i > 0 ? ", " : "").Append('"').Append(_members[random.Next(_members.Length)]).Append("\": ").Append(Value(2));
            }
            sb.Append('}');
        }
        if (random.Next(2) == 0)
        {
            sb.Append(", \"id\": ").Append(Value(2));
        }
        return sb.Append('}').ToString();
    }

    private string Value(int depth) => random.Next(depth > 0 ? 9 : 7) switch
    {
        0 => random.NextInt64(long.MinValue, long.MaxValue).ToString(System.Globalization.CultureInfo.InvariantCulture),
        1 => random.Next(2) == 0 ? "65536" : "1.5e300",
        2 => "\"" + RandomText() + "\"",
        3 => random.Next(2) == 0 ? "true" : "false",
        4 => "null",
        5 => "\"on-success\"",
        6 => "18446744073709551616",
        7 => "[" + string.Join(", ", Enumerable.Range(0, random.Next(3)).Select(_ => Value(depth - 1))) + "]",
        _ => "{\"name\": " + Value(depth - 1) + (random.Next(2) == 0 ? ", \"size\": " + Value(depth - 1) : "") + "}",
    };

    private string RandomText()
    {
        var chars = new StringBuilder();
        var n = random.Next(12);
        for (var i = 0; i < n; i++)
        {
            chars.Append(random.Next(10) switch
            {
                0 => "\\u00e9",
                1 => "\\\"",
                2 => "é",
                3 => "\\ud83d\\ude00",
                _ => ((char)random.Next('a', 'z' + 1)).ToString(),
            });
        }
        return chars.ToString();
    }

    private byte[] Special() => random.Next(8) switch
    {
        0 => Encoding.UTF8.GetBytes("{\"execute\": \"t\", \"execute\": \"query-version\"}"),
        1 => Encoding.UTF8.GetBytes("{\"execute\": \"t\", \"arguments\": {\"node\": \"a\", \"node\": \"b\"}}"),
        2 => Encoding.UTF8.GetBytes("{\"execute\": \"query-version\", \"id\": \"\\u" + (random.Next(2) == 0 ? "dbff" : "DC00") + "\"}"),
        3 => Encoding.UTF8.GetBytes("{\"execute\": \"query-version\", \"id\": " + new string('[', 1020 + random.Next(10)) + new string(']', 1020 + random.Next(10)) + "}"),
        4 => Encoding.UTF8.GetBytes("{\"execute\": \"t\", \"arguments\": {\"node\": \"" + new string('x', random.Next(1 << 16)) + "\"}}"),
        5 => Encoding.UTF8.GetBytes("{\"execute\": \"t\", \"arguments\": {" + string.Join(",", Enumerable.Range(0, random.Next(5000)).Select(i => $"\"k{i}\":{i}")) + "}}"),
        6 => [0xff, 0xfe, (byte)'{', 0xc3, 0x28, (byte)'}'],
        _ => [.. Encoding.UTF8.GetBytes("{\"execute\": \"query-version\", \"id\": \""), 0xed, 0xa0, 0x80, (byte)'"', (byte)'}'],
    };

    private byte[] Mutate(byte[] input)
    {
        var bytes = new List<byte>(input);
        var edits = 1 + random.Next(4);
        for (var e = 0; e < edits && bytes.Count > 0; e++)
        {
            var at = random.Next(bytes.Count);
            switch (random.Next(6))
            {
                case 0:
                    bytes[at] ^= (byte)(1 << random.Next(8));
                    break;
                case 1:
                    bytes.RemoveAt(at);
                    break;
                case 2:
                    bytes.Insert(at, (byte)"{}[],:\"\\ \n0-eE.tfnu"[random.Next(19)]);
                    break;
                case 3:
                    bytes.RemoveRange(at, bytes.Count - at);
                    break;
                case 4:
                    bytes.Insert(at, (byte)random.Next(256));
                    break;
                default:
                    var len = Math.Min(bytes.Count - at, random.Next(1, 16));
                    bytes.InsertRange(at, bytes.GetRange(at, len));
                    break;
            }
        }
        return [.. bytes];
    }
}
