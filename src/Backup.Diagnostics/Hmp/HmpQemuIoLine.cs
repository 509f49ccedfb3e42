using System.Text;

namespace Backup.Diagnostics.Hmp;

/// <summary>A parsed <c>qemu-io [-d] device "command"</c> line, or what QEMU's monitor says about it.</summary>
/// <param name="Reply">The monitor's text when the line is refused (its lines end in '\n'); null when parsed.</param>
/// <param name="Stdout">What QEMU's HMP parser prints on the process stdout on the way (bad escapes, unterminated strings).</param>
internal sealed record HmpQemuIoLine(bool Qdev, string Device, string Command, string? Reply, string Stdout);

/// <summary>
/// QEMU's HMP argument parser for the one command backupd's monitor has, qemu-io (args "qdev:-d,
/// device:B,command:s"): white space separates words, a word may be a "double-quoted" string with the
/// escapes \n \r \\ \' \", and nothing may follow the command. Error texts are the monitor's.
/// </summary>
internal static class HmpQemuIoParser
{
    public static HmpQemuIoLine Parse(string line)
    {
        ArgumentNullException.ThrowIfNull(line);
        var stdout = new StringBuilder();
        var p = SkipSpace(line, 0);
        var nameStart = p;
        while (p < line.Length && !IsSpace(line[p]))
        {
            p++;
        }
        var name = line[nameStart..p];
        if (name.Length == 0)
        {
            return new(false, "", "", "", "");
        }
        if (name != "qemu-io")
        {
            return new(false, "", "", $"unknown command: '{name}'\n", "");
        }
        var qdev = false;
        var q = SkipSpace(line, p);
        if (q < line.Length && line[q] == '-')
        {
            if (q + 1 < line.Length && line[q + 1] == 'd')
            {
                qdev = true;
                p = q + 2;
            }
            else
            {
                var c = q + 1 < line.Length ? line[q + 1].ToString() : "";
                return Refused($"qemu-io: unsupported option -{c}");
            }
        }
        var device = GetString(line, ref p, stdout);
        if (device is null)
        {
            return Refused("qemu-io: block device name expected");
        }
        var command = GetString(line, ref p, stdout);
        if (command is null)
        {
            return Refused("qemu-io: string expected");
        }
        p = SkipSpace(line, p);
        if (p < line.Length)
        {
            return Refused("qemu-io: extraneous characters at the end of line");
        }
        return new(qdev, device, command, null, stdout.ToString());

        HmpQemuIoLine Refused(string why) =>
            new(qdev, "", "", why + "\nTry \"help qemu-io\" for more information\n", stdout.ToString());
    }

    /// <summary>get_str: a bare word or a quoted string; null (after printing why, for bad strings) when there is none.</summary>
    private static string? GetString(string line, ref int p, StringBuilder stdout)
    {
        p = SkipSpace(line, p);
        if (p >= line.Length)
        {
            return null;
        }
        var sb = new StringBuilder();
        if (line[p] != '"')
        {
            while (p < line.Length && !IsSpace(line[p]))
            {
                sb.Append(line[p++]);
            }
            return sb.ToString();
        }
        p++;
        while (p < line.Length && line[p] != '"')
        {
            if (line[p] != '\\')
            {
                sb.Append(line[p++]);
                continue;
            }
            p++;
            var c = p < line.Length ? line[p++] : '\0';
            switch (c)
            {
                case 'n': sb.Append('\n'); break;
                case 'r': sb.Append('\r'); break;
                case '\\' or '\'' or '"': sb.Append(c); break;
                default:
                    stdout.Append($"unsupported escape code: '\\{(c == '\0' ? "" : c.ToString())}'\n");
                    return null;
            }
        }
        if (p >= line.Length)
        {
            stdout.Append("unterminated string\n");
            return null;
        }
        p++;
        return sb.ToString();
    }

    private static int SkipSpace(string s, int i)
    {
        while (i < s.Length && IsSpace(s[i]))
        {
            i++;
        }
        return i;
    }

    private static bool IsSpace(char c) => c is ' ' or '\t' or '\n' or '\v' or '\f' or '\r';
}
