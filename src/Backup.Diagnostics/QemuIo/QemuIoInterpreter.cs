using System.Text;
using Backup.Block;
using Backup.Diagnostics.QemuIo.Commands;

namespace Backup.Diagnostics.QemuIo;

/// <summary>
/// qemu-io's command loop for one line (qemuio_command): split on spaces, find the command by name or
/// alias, check the argument count, take the write permission when needed, run. Every message goes where
/// QEMU prints it; nothing here throws for a qemu-io level failure.
/// </summary>
public sealed class QemuIoInterpreter
{
    private readonly Dictionary<string, QemuIoCommandInfo> _byName = new(StringComparer.Ordinal);

    public QemuIoInterpreter(IQemuIoConsole console, AioRequests aio)
    {
        Console = console ?? throw new ArgumentNullException(nameof(console));
        Aio = aio ?? throw new ArgumentNullException(nameof(aio));
        IEnumerable<QemuIoCommandInfo> all =
        [
            .. ReadCommands.All, .. WriteCommands.All, .. AioCommands.All, .. BlockCommands.All, .. DebugCommands.All,
            new("help", "?", 0, 1, "[command]", "help for one or all commands", NeedsWrite: false, Help),
        ];
        foreach (var c in all)
        {
            _byName.Add(c.Name, c);
            if (c.AltName is { } alt)
            {
                _byName.Add(alt, c);
            }
        }
    }

    public IQemuIoConsole Console { get; }

    /// <summary>help_f: one line per command, sorted by name, or the line of one command.</summary>
    private ValueTask Help(QemuIoInvocation io)
    {
        if (io.Argv.Count == 1)
        {
            foreach (var c in _byName.Values.Distinct().OrderBy(c => c.Name, StringComparer.Ordinal))
            {
                io.Print(HelpLine(c.Name, c));
            }
            io.Print("\nUse 'help commandname' for extended help.\n");
        }
        else if (_byName.TryGetValue(io.Argv[1], out var one))
        {
            io.Print(HelpLine(io.Argv[1], one));
        }
        else
        {
            io.Print($"command {io.Argv[1]} not found\n");
        }
        return ValueTask.CompletedTask;
    }

    /// <summary>help_oneline: "name [args ]-- oneline" (no args, no space for them).</summary>
    private static string HelpLine(string name, QemuIoCommandInfo c) =>
        c.Args is null ? $"{name} -- {c.OneLine}\n" : $"{name} {c.Args} -- {c.OneLine}\n";

    public AioRequests Aio { get; }

    public IEnumerable<string> CommandNames => _byName.Values.Select(c => c.Name).Distinct();

    /// <summary>breakline: words separated by single spaces, empty words dropped; tabs and quotes are ordinary characters.</summary>
    public static List<string> BreakLine(string line)
    {
        ArgumentNullException.ThrowIfNull(line);
        return [.. line.Split(' ', StringSplitOptions.RemoveEmptyEntries)];
    }

    /// <summary>Runs one command line on <paramref name="node"/>; what QEMU's monitor would print is appended to <paramref name="monitor"/>.</summary>
    public async ValueTask RunAsync(BlockNode node, string line, StringBuilder monitor, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(node);
        ArgumentNullException.ThrowIfNull(monitor);
        var argv = BreakLine(line);
        if (argv.Count == 0)
        {
            return;
        }
        if (!_byName.TryGetValue(argv[0], out var command))
        {
            Console.Error($"command \"{argv[0]}\" not found\n");
            return;
        }
        var n = argv.Count - 1;
        if (n < command.ArgMin || (command.ArgMax != -1 && n > command.ArgMax))
        {
            Console.Error(command.ArgMax == -1
                ? $"bad argument count {n} to {argv[0]}, expected at least {command.ArgMin} arguments\n"
                : command.ArgMin == command.ArgMax
                    ? $"bad argument count {n} to {argv[0]}, expected {command.ArgMin} arguments\n"
                    : $"bad argument count {n} to {argv[0]}, expected between {command.ArgMin} and {command.ArgMax} arguments\n");
            return;
        }
        if (command.NeedsWrite && node.ReadOnly)
        {
            // The write permission is refused before the command runs (blk_set_perm); QEMU reports it with error_report.
            monitor.Append("Block node is read-only\n");
            return;
        }
        await command.Run(new QemuIoInvocation(command, node, argv, Console, monitor, Aio, cancellationToken)).ConfigureAwait(false);
    }
}
