using System.Text;
using Backup.Block;

namespace Backup.Diagnostics.QemuIo;

/// <summary>One run of one qemu-io command: the node, the words, where to print, and the helpers every command uses.</summary>
internal sealed class QemuIoInvocation(
    QemuIoCommandInfo command,
    BlockNode node,
    IReadOnlyList<string> argv,
    IQemuIoConsole console,
    StringBuilder monitor,
    AioRequests aio,
    CancellationToken cancellationToken)
{
    public QemuIoCommandInfo Command { get; } = command;

    public BlockNode Node { get; } = node;

    /// <summary>The words, the command name (as typed) first.</summary>
    public IReadOnlyList<string> Argv { get; } = argv;

    public IQemuIoConsole Console { get; } = console;

    public AioRequests Aio { get; } = aio;

    public CancellationToken CancellationToken { get; } = cancellationToken;

    public void Print(string text) => Console.Out(text);

    /// <summary>What QEMU's monitor prints (warn_report, error_report): it becomes the HMP reply.</summary>
    public void Monitor(string line) => monitor.Append(line).Append('\n');

    /// <summary>qemuio_command_usage, on stdout.</summary>
    public void PrintUsage() => Print(Command.Usage);

    /// <summary>getopt with the command's optstring; a getopt error is printed (stderr, then usage) by <see cref="FinishOptions"/>.</summary>
    public GetOptResult GetOpt(string optstring) => QemuIo.GetOpt.Parse(Argv, optstring);

    /// <summary>
    /// After the options before a getopt error were handled (qemu-io handles each as getopt returns it), prints
    /// that error and the usage; true when there was none.
    /// </summary>
    public bool FinishOptions(GetOptResult parsed)
    {
        ArgumentNullException.ThrowIfNull(parsed);
        if (parsed.Error is null)
        {
            return true;
        }
        Console.Error(parsed.Error + "\n");
        PrintUsage();
        return false;
    }

    /// <summary>cvtnum and print_cvtnum_err; the deprecation warning for a suffixed hex number goes to the monitor.</summary>
    public bool TryParseSize(string text, out long value)
    {
        var error = QemuNumbers.TryParseSize(text, out value, out var hexWithSuffix);
        if (hexWithSuffix)
        {
            Monitor($"warning: Using a multiplier suffix on hex numbers is deprecated: {text}");
        }
        if (error != SizeError.None)
        {
            Print(QemuNumbers.ErrorText(error, text) + "\n");
            return false;
        }
        return true;
    }

    /// <summary>parse_pattern: strtol base 0, one byte.</summary>
    public bool TryParsePattern(string text, out byte pattern)
    {
        if (QemuNumbers.TryParseLong(text, out var v) && v is >= 0 and <= 255)
        {
            pattern = (byte)v;
            return true;
        }
        Print($"{text} is not a valid pattern byte\n");
        pattern = 0;
        return false;
    }
}
