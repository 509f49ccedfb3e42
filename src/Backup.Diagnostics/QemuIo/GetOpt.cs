namespace Backup.Diagnostics.QemuIo;

/// <summary>One option getopt returned: its letter and, for "x:" options, its argument.</summary>
internal readonly record struct ParsedOption(char Letter, string? Argument);

/// <summary>What getopt made of a command's words: the options in order and the operands, or an error.</summary>
/// <param name="Error">glibc's message ("write: invalid option -- 'x'"), printed on stderr; null when parsing succeeded.</param>
internal sealed record GetOptResult(IReadOnlyList<ParsedOption> Options, IReadOnlyList<string> Operands, string? Error);

/// <summary>
/// glibc's getopt as qemu-io calls it (optstring without '+' or ':'), so argument order is permuted:
/// options may follow operands ("write 0 512 -q"), flags group ("-qz"), an option's value is attached
/// ("-P0x49") or the next word even when it starts with '-' ("-P -1"), "--" ends the options, and a
/// lone "-" is an operand. Options are processed left to right up to the first error, as qemu-io stops there.
/// </summary>
internal static class GetOpt
{
    public static GetOptResult Parse(IReadOnlyList<string> argv, string optstring)
    {
        ArgumentNullException.ThrowIfNull(argv);
        ArgumentNullException.ThrowIfNull(optstring);
        var command = argv.Count > 0 ? argv[0] : "";
        var options = new List<ParsedOption>();
        var operands = new List<string>();
        for (var i = 1; i < argv.Count; i++)
        {
            var word = argv[i];
            if (word == "--")
            {
                for (i++; i < argv.Count; i++)
                {
                    operands.Add(argv[i]);
                }
                break;
            }
            if (word.Length < 2 || word[0] != '-')
            {
                operands.Add(word);
                continue;
            }
            for (var j = 1; j < word.Length; j++)
            {
                var c = word[j];
                var at = c is ':' ? -1 : optstring.IndexOf(c, StringComparison.Ordinal);
                if (at < 0)
                {
                    return new GetOptResult(options, operands, $"{command}: invalid option -- '{c}'");
                }
                if (at + 1 < optstring.Length && optstring[at + 1] == ':')
                {
                    if (j + 1 < word.Length)
                    {
                        options.Add(new ParsedOption(c, word[(j + 1)..]));
                    }
                    else if (i + 1 < argv.Count)
                    {
                        options.Add(new ParsedOption(c, argv[++i]));
                    }
                    else
                    {
                        return new GetOptResult(options, operands, $"{command}: option requires an argument -- '{c}'");
                    }
                    break;
                }
                options.Add(new ParsedOption(c, null));
            }
        }
        return new GetOptResult(options, operands, null);
    }
}
