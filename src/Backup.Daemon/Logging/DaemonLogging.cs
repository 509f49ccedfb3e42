using System.Globalization;
using Backup.Daemon.CommandLine;
using Microsoft.Extensions.Logging;
using Serilog;
using Serilog.Core;
using Serilog.Events;
using Serilog.Formatting;
using Serilog.Formatting.Compact;
using Serilog.Formatting.Display;

namespace Backup.Daemon.Logging;

/// <summary>
/// The daemon's Serilog pipeline. Everything goes to stderr (stdout belongs to the demo run's and
/// --daemonize's messages) and, with --log-file, to that file too; both in the chosen format:
/// <list type="bullet">
/// <item>text: one line per event, with time, level and source, for a person at a terminal;</item>
/// <item>json: compact JSON (CLEF), one event per line, every structured property kept;</item>
/// <item>journal (text on a stderr that is systemd's journal stream): no time (the journal stamps each
/// line), no colours, and a syslog priority prefix such as <c>&lt;6&gt;</c> so journalctl -p works.</item>
/// </list>
/// </summary>
public static class DaemonLogging
{
    public const string TextTemplate = "{Timestamp:yyyy-MM-dd HH:mm:ss.fff} [{Level:u3}] {SourceContext}: {Message:lj}{NewLine}{Exception}";

    public const string JournalTemplate = "<{" + SyslogPriorityEnricher.PropertyName + "}>{SourceContext}: {Message:lj}{NewLine}{Exception}";

    /// <summary>Quiet like QSD unless asked (warnings and errors only); the demo run tells what it does.</summary>
    public static LogLevel EffectiveLevel(DaemonOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        return options.LogLevel ?? (options.DemoMode ? LogLevel.Information : LogLevel.Warning);
    }

    public static Logger CreateLogger(DaemonOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var level = EffectiveLevel(options) switch
        {
            LogLevel.Trace => LogEventLevel.Verbose,
            LogLevel.Debug => LogEventLevel.Debug,
            LogLevel.Information => LogEventLevel.Information,
            LogLevel.Warning => LogEventLevel.Warning,
            _ => LogEventLevel.Error,
        };
        var journal = options.LogFormat == LogFormat.Text && JournalStream.IsStderr();
        var config = new LoggerConfiguration()
            .MinimumLevel.Is(level)
            // The host's own lifetime chatter ("Application started", content root) is not the daemon's story.
            .MinimumLevel.Override("Microsoft", LogEventLevel.Warning)
            .Enrich.FromLogContext();
        if (journal)
        {
            config = config.Enrich.With<SyslogPriorityEnricher>()
                .WriteTo.Console(new MessageTemplateTextFormatter(JournalTemplate, CultureInfo.InvariantCulture),
                    standardErrorFromLevel: LogEventLevel.Verbose);
        }
        else if (options.LogFormat == LogFormat.Json)
        {
            config = config.WriteTo.Console(new CompactJsonFormatter(), standardErrorFromLevel: LogEventLevel.Verbose);
        }
        else
        {
            config = config.WriteTo.Console(outputTemplate: TextTemplate, standardErrorFromLevel: LogEventLevel.Verbose,
                formatProvider: CultureInfo.InvariantCulture);
        }
        if (options.LogFile is { } file)
        {
            ITextFormatter fileFormat = options.LogFormat == LogFormat.Json
                ? new CompactJsonFormatter()
                : new MessageTemplateTextFormatter(TextTemplate, CultureInfo.InvariantCulture);
            config = config.WriteTo.File(fileFormat, file);
        }
        return config.CreateLogger();
    }
}

/// <summary>The syslog priority of an event (sd-daemon(3)'s &lt;N&gt; prefixes): 7 debug … 2 critical.</summary>
public sealed class SyslogPriorityEnricher : ILogEventEnricher
{
    public const string PropertyName = "SyslogPriority";

    private static readonly LogEventProperty[] Priorities =
    [
        new(PropertyName, new ScalarValue(7)), // Verbose
        new(PropertyName, new ScalarValue(7)), // Debug
        new(PropertyName, new ScalarValue(6)), // Information
        new(PropertyName, new ScalarValue(4)), // Warning
        new(PropertyName, new ScalarValue(3)), // Error
        new(PropertyName, new ScalarValue(2)), // Fatal
    ];

    public void Enrich(LogEvent logEvent, ILogEventPropertyFactory propertyFactory)
    {
        ArgumentNullException.ThrowIfNull(logEvent);
        logEvent.AddPropertyIfAbsent(Priorities[(int)logEvent.Level]);
    }
}

/// <summary>
/// Whether stderr is connected to systemd's journal: systemd sets JOURNAL_STREAM to the device and inode
/// of the stream it gave the service (systemd.exec(5)); a child whose stderr was redirected inherits the
/// variable but not the stream, so the inode must match stderr's.
/// </summary>
public static class JournalStream
{
    public static bool IsStderr() => Matches(Environment.GetEnvironmentVariable("JOURNAL_STREAM"), StderrInode());

    /// <summary>JOURNAL_STREAM is "DEVICE:INODE"; <paramref name="stderrInode"/> is stderr's inode, if known.</summary>
    public static bool Matches(string? journalStream, ulong? stderrInode)
    {
        if (journalStream is null || stderrInode is null)
        {
            return false;
        }
        var colon = journalStream.IndexOf(':', StringComparison.Ordinal);
        return colon > 0
            && ulong.TryParse(journalStream.AsSpan(colon + 1), NumberStyles.None, CultureInfo.InvariantCulture, out var inode)
            && inode == stderrInode;
    }

    /// <summary>From /proc/self/fd/2's link, "socket:[N]" or "pipe:[N]"; null for files and elsewhere.</summary>
    private static ulong? StderrInode()
    {
        try
        {
            var target = new FileInfo("/proc/self/fd/2").LinkTarget;
            if (target is null)
            {
                return null;
            }
            var open = target.IndexOf(":[", StringComparison.Ordinal);
            return open > 0 && target.EndsWith(']')
                && ulong.TryParse(target.AsSpan(open + 2, target.Length - open - 3), NumberStyles.None, CultureInfo.InvariantCulture, out var inode)
                ? inode
                : null;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;
        }
    }
}
