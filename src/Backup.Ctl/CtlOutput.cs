using System.Text.Json;
using System.Text.Json.Nodes;
using Spectre.Console;

namespace Backup.Ctl;

/// <summary>
/// Where backupctl writes. For people: tables, progress bars and messages on standard output through
/// Spectre.Console. With <c>--json</c> (for scripts): messages go to standard error, no progress bars, and
/// the result is exactly one compact JSON object on the last line of standard output.
/// </summary>
public sealed class CtlOutput
{
    private static readonly JsonSerializerOptions Compact = new() { WriteIndented = false };
    private readonly TextWriter _stdout;

    public CtlOutput(TextWriter stdout, TextWriter stderr, bool json, bool interactive)
    {
        _stdout = stdout;
        Error = stderr;
        Json = json;
        Console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(json ? stderr : stdout),
            Ansi = interactive ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = interactive ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
            Interactive = interactive ? InteractionSupport.Yes : InteractionSupport.No,
        });
        if (!interactive)
        {
            // Redirected output has no terminal width; 80 columns would wrap every table row.
            Console.Profile.Width = 200;
        }
        Interactive = interactive && !json;
    }

    /// <summary>True with <c>--json</c>.</summary>
    public bool Json { get; }

    /// <summary>True when a terminal can show live progress bars.</summary>
    public bool Interactive { get; }

    /// <summary>Where human-readable output goes (standard error with <c>--json</c>).</summary>
    public IAnsiConsole Console { get; }

    public TextWriter Error { get; }

    /// <summary>A line for people (plain text, no markup); with <c>--json</c> it goes to standard error.</summary>
    public void Say(string text) => Console.WriteLine(text);

    /// <summary>Writes the one result line of <c>--json</c> (ignored otherwise).</summary>
    public void Result(JsonObject result)
    {
        if (Json)
        {
            _stdout.WriteLine(result.ToJsonString(Compact));
            _stdout.Flush();
        }
    }

    /// <summary>A raw line on standard output in both modes (events, passthrough replies).</summary>
    public void Line(string text)
    {
        _stdout.WriteLine(text);
        _stdout.Flush();
    }
}
