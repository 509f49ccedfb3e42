using System.Buffers;
using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Qmp.Commands;

/// <summary>
/// human-monitor-command, for iotest-style suites: only QEMU's <c>qemu-io NODE "SUBCOMMAND"</c>. The
/// I/O goes through the node's one I/O path, so it is a guest write like any other: it marks the
/// node's bitmaps and passes its observers.
/// </summary>
public sealed class QemuIoCommand(BlockGraph graph) : ICommandModule
{
    /// <summary>Largest single request, as qemu-io refuses more than its buffer limit.</summary>
    public const long MaxRequestBytes = 256L << 20;

    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("human-monitor-command", async (args, _, ct) =>
            JsonValue.Create(await RunAsync(args["command-line"]!.GetValue<string>(), ct).ConfigureAwait(false)));
    }

    public async ValueTask<string> RunAsync(string commandLine, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(commandLine);
        var words = Split(commandLine);
        if (words.Count == 0 || words[0] != "qemu-io")
        {
            throw new BlockException($"The command {(words.Count > 0 ? words[0] : "")} is not supported: only qemu-io is");
        }
        var rest = words.Skip(1).Where(w => w != "-d").ToList();
        if (rest.Count != 2)
        {
            throw new BlockException("Usage: qemu-io [-d] NODE \"SUBCOMMAND\"");
        }
        var node = graph.Get(rest[0]);
        var sub = Split(rest[1]);
        if (sub.Count == 0)
        {
            throw new BlockException("qemu-io: empty subcommand");
        }
        try
        {
            return sub[0] switch
            {
                "write" => await WriteAsync(node, sub.Skip(1).ToList(), cancellationToken).ConfigureAwait(false),
                "read" => await ReadAsync(node, sub.Skip(1).ToList(), cancellationToken).ConfigureAwait(false),
                "discard" => await DiscardAsync(node, sub.Skip(1).ToList(), cancellationToken).ConfigureAwait(false),
                "flush" => await FlushAsync(node, cancellationToken).ConfigureAwait(false),
                _ => throw new BlockException($"qemu-io: command '{sub[0]}' is not supported (write, read, discard, flush)"),
            };
        }
        catch (IOException e)
        {
            throw new BlockException($"qemu-io: {sub[0]} failed: {e.Message}");
        }
    }

    private static async ValueTask<string> WriteAsync(BlockNode node, List<string> a, CancellationToken ct)
    {
        byte pattern = 0xcd; // qemu-io's default write pattern
        var zero = false;
        var unmap = false;
        var positional = new List<string>();
        for (var i = 0; i < a.Count; i++)
        {
            switch (a[i])
            {
                case "-P" when i + 1 < a.Count:
                    pattern = ParsePattern(a[++i]);
                    break;
                case "-z":
                    zero = true;
                    break;
                case "-u":
                    unmap = true;
                    break;
                default:
                    positional.Add(a[i]);
                    break;
            }
        }
        var (offset, length) = Range(node, positional, "write");
        if (unmap && !zero)
        {
            throw new BlockException("qemu-io: -u requires -z");
        }
        if (zero)
        {
            await node.WriteZeroesAsync(offset, length, unmap ? WriteFlags.MayUnmap : WriteFlags.None, ct).ConfigureAwait(false);
        }
        else
        {
            var buffer = ArrayPool<byte>.Shared.Rent((int)length);
            try
            {
                buffer.AsSpan(0, (int)length).Fill(pattern);
                await node.WriteAsync(offset, buffer.AsMemory(0, (int)length), WriteFlags.None, ct).ConfigureAwait(false);
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }
        return $"wrote {length}/{length} bytes at offset {offset}\n";
    }

    private static async ValueTask<string> ReadAsync(BlockNode node, List<string> a, CancellationToken ct)
    {
        byte? pattern = null;
        var positional = new List<string>();
        for (var i = 0; i < a.Count; i++)
        {
            if (a[i] == "-P" && i + 1 < a.Count)
            {
                pattern = ParsePattern(a[++i]);
            }
            else
            {
                positional.Add(a[i]);
            }
        }
        var (offset, length) = Range(node, positional, "read");
        var buffer = ArrayPool<byte>.Shared.Rent((int)length);
        try
        {
            await node.ReadAsync(offset, buffer.AsMemory(0, (int)length), ct).ConfigureAwait(false);
            if (pattern is { } p)
            {
                var bad = buffer.AsSpan(0, (int)length).IndexOfAnyExcept(p);
                if (bad >= 0)
                {
                    throw new BlockException($"Pattern verification failed at offset {offset + bad}, {length - bad} bytes");
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return $"read {length}/{length} bytes at offset {offset}\n";
    }

    private static async ValueTask<string> DiscardAsync(BlockNode node, List<string> a, CancellationToken ct)
    {
        var (offset, length) = Range(node, a, "discard");
        await node.DiscardAsync(offset, length, ct).ConfigureAwait(false);
        return $"discard {length}/{length} bytes at offset {offset}\n";
    }

    private static async ValueTask<string> FlushAsync(BlockNode node, CancellationToken ct)
    {
        await node.FlushAsync(ct).ConfigureAwait(false);
        return "";
    }

    private static (long Offset, long Length) Range(BlockNode node, List<string> positional, string command)
    {
        if (positional.Count != 2)
        {
            throw new BlockException($"qemu-io: {command} takes OFFSET and LENGTH");
        }
        var offset = ParseSize(positional[0]);
        var length = ParseSize(positional[1]);
        if (length > MaxRequestBytes)
        {
            throw new BlockException($"qemu-io: length {length} is larger than {MaxRequestBytes} bytes");
        }
        if (offset + length > node.Length)
        {
            throw new BlockException($"qemu-io: offset {offset} + length {length} is past the end of node '{node.NodeName}' ({node.Length} bytes)");
        }
        return (offset, length);
    }

    /// <summary>qemu-io's cvtnum: a number (decimal or 0x hex) with an optional binary suffix.</summary>
    public static long ParseSize(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        var shift = text.Length == 0 ? -1 : char.ToLowerInvariant(text[^1]) switch
        {
            'b' => 0,
            'k' => 10,
            'm' => 20,
            'g' => 30,
            't' => 40,
            'p' => 50,
            'e' => 60,
            _ => -1,
        };
        var digits = shift >= 0 ? text[..^1] : text;
        var ok = digits.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
            ? long.TryParse(digits.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var v)
            : long.TryParse(digits, NumberStyles.None, CultureInfo.InvariantCulture, out v);
        if (!ok || v < 0 || (shift > 0 && v > (long.MaxValue >> shift)))
        {
            throw new BlockException($"qemu-io: invalid size '{text}'");
        }
        return v << Math.Max(shift, 0);
    }

    private static byte ParsePattern(string text)
    {
        var v = ParseSize(text);
        return v <= 255 ? (byte)v : throw new BlockException($"qemu-io: invalid pattern '{text}'");
    }

    /// <summary>Splits on blanks, keeping "double" or 'single' quoted words together.</summary>
    private static List<string> Split(string text)
    {
        var words = new List<string>();
        var sb = new StringBuilder();
        char? quote = null;
        var inWord = false;
        foreach (var c in text)
        {
            if (quote is { } q)
            {
                if (c == q)
                {
                    quote = null;
                }
                else
                {
                    sb.Append(c);
                }
            }
            else if (c is '"' or '\'')
            {
                quote = c;
                inWord = true;
            }
            else if (char.IsWhiteSpace(c))
            {
                if (inWord)
                {
                    words.Add(sb.ToString());
                    sb.Clear();
                    inWord = false;
                }
            }
            else
            {
                sb.Append(c);
                inWord = true;
            }
        }
        if (quote is not null)
        {
            throw new BlockException("qemu-io: unterminated quote");
        }
        if (inWord)
        {
            words.Add(sb.ToString());
        }
        return words;
    }
}
