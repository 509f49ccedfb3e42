using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Qmp.Schema;
using Backup.Qmp.Server;
using Microsoft.Extensions.Logging;

namespace Backup.Daemon.CommandLine;

/// <summary>
/// Reads qemu-storage-daemon's command line (the subset backupd implements) plus backupd's friendlier
/// forms (--qmp, --config, --log-file, --log-level, --log-format). Everything is checked here, before anything is
/// opened: a bad option is one line and exit status 1.
/// </summary>
public sealed class CommandLineParser(SchemaModel schema)
{
    /// <summary>
    /// Options that are QMP commands in disguise: option → (command, implied key of its key=value form,
    /// and the schema type to check it against when that is not the command's own arguments).
    /// --nbd-server takes QSD's flat address form (NbdServerOptions), not nbd-server-start's legacy one.
    /// </summary>
    private static readonly Dictionary<string, (string Command, string? ImpliedKey, string? ArgumentType)> CommandOptions = new(StringComparer.Ordinal)
    {
        ["--blockdev"] = ("blockdev-add", "driver", null),
        ["--object"] = ("object-add", "qom-type", null),
        ["--nbd-server"] = ("nbd-server-start", null, "NbdServerOptions"),
        ["--export"] = ("block-export-add", "type", null),
    };

    private static readonly HashSet<string> ValueOptions = new(StringComparer.Ordinal)
    {
        "--chardev", "--monitor", "--pidfile", "--qmp", "--config", "--log-file", "--log-level", "--log-format", "-T", "--trace",
        "--qmp-max-sessions",
    };

    private static readonly HashSet<string> FlagOptions = new(StringComparer.Ordinal)
    {
        "-h", "--help", "-V", "--version", "--daemonize",
    };

    /// <summary>Every option the parser accepts (the help text must list each: a test checks it).</summary>
    public static IReadOnlyList<string> KnownOptions { get; } =
        [.. FlagOptions, .. ValueOptions, .. CommandOptions.Keys];

    public DaemonOptions Parse(IReadOnlyList<string> args)
    {
        ArgumentNullException.ThrowIfNull(args);
        if (args.Count == 0)
        {
            return new DaemonOptions { DemoMode = true };
        }
        var state = new ParseState();
        for (var i = 0; i < args.Count; i++)
        {
            var arg = args[i];
            if (arg.Length < 2 || arg[0] != '-')
            {
                throw new CommandLineException($"{arg}: Unexpected argument");
            }
            string option;
            string? value = null;
            var isLong = arg.StartsWith("--", StringComparison.Ordinal);
            var eq = isLong ? arg.IndexOf('=', StringComparison.Ordinal) : -1;
            if (eq > 0)
            {
                option = arg[..eq];
                value = arg[(eq + 1)..];
            }
            else if (!isLong && arg.Length > 2 && ValueOptions.Contains(arg[..2]))
            {
                // getopt: a short option's value may be attached (-Tpattern).
                option = arg[..2];
                value = arg[2..];
            }
            else
            {
                option = arg;
            }
            var takesValue = ValueOptions.Contains(option) || (CommandOptions.TryGetValue(option, out var co) && schema.Commands.ContainsKey(co.Command));
            if (!takesValue && !FlagOptions.Contains(option))
            {
                // getopt_long's words.
                throw new CommandLineException(isLong ? $"unrecognized option '{option}'" : $"invalid option -- '{option[1]}'");
            }
            if (takesValue && value is null)
            {
                if (i + 1 >= args.Count)
                {
                    throw new CommandLineException(isLong ? $"option '{option}' requires an argument" : $"option requires an argument -- '{option[1]}'");
                }
                value = args[++i];
            }
            else if (!takesValue && value is not null)
            {
                throw new CommandLineException($"option '{option}' doesn't allow an argument");
            }
            Apply(state, option, value);
        }
        return state.Build();
    }

    private void Apply(ParseState state, string option, string? value)
    {
        switch (option)
        {
            case "-h" or "--help":
                state.Help = true;
                return;
            case "-V" or "--version":
                state.Version = true;
                return;
            case "--daemonize":
                state.Daemonize = true;
                return;
            case "--pidfile":
                state.PidFile = value;
                return;
            case "--log-file":
                state.LogFile = value;
                return;
            case "--log-level":
                state.LogLevel = ParseLogLevel(value!);
                return;
            case "--log-format":
                state.LogFormat = ParseLogFormat(value!);
                return;
            case "-T" or "--trace":
                // QEMU trace points have no meaning here; the closest is verbose logging.
                state.LogLevel = LogLevel.Trace;
                return;
            case "--chardev":
                AddChardev(state, value!);
                return;
            case "--monitor":
                AddMonitor(state, value!);
                return;
            case "--qmp":
                state.Monitors.Add(new MonitorSpec(ParseQmpAddress(value!), Wait: false, "--qmp " + value));
                return;
            case "--config":
                ApplyConfig(state, value!);
                return;
            case "--qmp-max-sessions":
                state.QmpMaxSessions = ParseSessionLimit(value!);
                return;
        }
        if (CommandOptions.TryGetValue(option, out var c) && schema.Commands.TryGetValue(c.Command, out var def))
        {
            var type = c.ArgumentType is null ? def.Arguments : (StructType)schema.Types[c.ArgumentType];
            state.Commands.Add(ParseCommandOption(option, value!, def.Name, type, c.ImpliedKey));
            return;
        }
        throw new CommandLineException($"unrecognized option '{option}'");
    }

    private static StartupCommand ParseCommandOption(string option, string text, string command, StructType type, string? impliedKey)
    {
        try
        {
            JsonObject raw;
            InputForm form;
            if (KeyValueSyntax.IsJson(text))
            {
                raw = JsonNode.Parse(text) as JsonObject ?? throw new BlockException("QMP input must be a JSON object");
                form = InputForm.Json;
            }
            else
            {
                raw = KeyValueSyntax.Parse(text, impliedKey);
                form = InputForm.KeyValue;
            }
            return new StartupCommand(option, text, command, InputValidator.ValidateArguments(raw, type, form));
        }
        catch (JsonException e)
        {
            throw new CommandLineException($"{option} {text}: JSON parse error, {e.Message}");
        }
        catch (BlockException e)
        {
            throw new CommandLineException($"{option} {text}: {e.Message}");
        }
    }

    private static void AddChardev(ParseState state, string text)
    {
        var spec = ChardevSpec.Parse(text, state.Warnings);
        if (!state.Chardevs.TryAdd(spec.Id, spec))
        {
            // QEMU's words: a second socket chardev with the same id collides on its yank instance first.
            throw new CommandLineException($"--chardev {text}: duplicate yank instance");
        }
    }

    /// <summary>
    /// --monitor: QSD reads options in order, so the chardev must come first; one monitor per chardev.
    /// </summary>
    private static void AddMonitor(ParseState state, string text)
    {
        JsonObject o;
        try
        {
            o = KeyValueSyntax.Parse(text, "chardev");
        }
        catch (BlockException e)
        {
            throw new CommandLineException($"--monitor {text}: {e.Message}");
        }
        foreach (var (key, v) in o)
        {
            var s = v?.GetValue<string>();
            switch (key)
            {
                case "chardev" or "id":
                    break;
                case "mode" when s != "control":
                    throw new CommandLineException($"--monitor {text}: Only QMP is supported");
                case "mode":
                    break;
                case "pretty" when s is not ("on" or "off" or "yes" or "no" or "true" or "false"):
                    throw new CommandLineException($"--monitor {text}: Parameter 'pretty' expects 'on' or 'off'");
                case "pretty":
                    break;
                default:
                    throw new CommandLineException($"--monitor {text}: Parameter '{key}' is unexpected");
            }
        }
        var chardev = o["chardev"]?.GetValue<string>() ?? throw new CommandLineException($"--monitor {text}: Parameter 'chardev' is missing");
        if (!state.Chardevs.TryGetValue(chardev, out var spec))
        {
            throw new CommandLineException($"--monitor {text}: chardev \"{chardev}\" not found");
        }
        if (!state.UsedChardevs.Add(chardev))
        {
            throw new CommandLineException($"--monitor {text}: Device '{chardev}' is in use");
        }
        state.Monitors.Add(new MonitorSpec(spec.Endpoint, spec.Wait, "--chardev " + spec.Text, spec.TlsCreds, spec.TlsAuthz));
    }

    /// <summary><c>unix:PATH</c> or <c>tcp:HOST:PORT</c>.</summary>
    public static QmpEndpoint ParseQmpAddress(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        if (text.StartsWith("unix:", StringComparison.Ordinal) && text.Length > 5)
        {
            return new QmpEndpoint.Unix(text[5..]);
        }
        if (text.StartsWith("tcp:", StringComparison.Ordinal))
        {
            var rest = text[4..];
            var colon = rest.LastIndexOf(':');
            if (colon > 0 && int.TryParse(rest[(colon + 1)..], NumberStyles.None, CultureInfo.InvariantCulture, out var port) && port <= 65535)
            {
                return new QmpEndpoint.Tcp(rest[..colon].Trim('[', ']'), port);
            }
        }
        throw new CommandLineException($"--qmp {text}: expected 'unix:PATH' or 'tcp:HOST:PORT'");
    }

    private static LogLevel ParseLogLevel(string value) => value.ToLowerInvariant() switch
    {
        "trace" or "verbose" => LogLevel.Trace,
        "debug" => LogLevel.Debug,
        "info" or "information" => LogLevel.Information,
        "warning" or "warn" => LogLevel.Warning,
        "error" => LogLevel.Error,
        _ => throw new CommandLineException($"--log-level {value}: expected one of trace, debug, info, warning, error"),
    };

    private static LogFormat ParseLogFormat(string value) => value.ToLowerInvariant() switch
    {
        "text" => LogFormat.Text,
        "json" => LogFormat.Json,
        _ => throw new CommandLineException($"--log-format {value}: expected text or json"),
    };

    /// <summary>
    /// --config FILE: a JSON object with the same settings as the command line. Keys are option names
    /// without dashes; repeatable options take a list; command options accept JSON objects or strings.
    /// </summary>
    private static int ParseSessionLimit(string value) =>
        int.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out var n) && n is >= 1 and <= QmpServer.MaxSessionsLimit
            ? n
            : throw new CommandLineException(
                $"--qmp-max-sessions {value}: expected a number of sessions from 1 to {QmpServer.MaxSessionsLimit}");

    private void ApplyConfig(ParseState state, string path)
    {
        JsonObject config;
        try
        {
            config = JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                ?? throw new CommandLineException($"--config {path}: the file must hold a JSON object");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CommandLineException($"--config {path}: {e.Message}");
        }
        catch (JsonException e)
        {
            throw new CommandLineException($"--config {path}: JSON parse error, {e.Message}");
        }
        foreach (var (key, value) in config)
        {
            var option = "--" + key;
            var values = value is JsonArray a ? a.ToList() : [value];
            foreach (var v in values)
            {
                switch (v)
                {
                    case JsonValue jv when jv.GetValueKind() == JsonValueKind.True:
                        Apply(state, option, null);
                        break;
                    case JsonValue jv when jv.GetValueKind() == JsonValueKind.False:
                        break;
                    case JsonValue jv when jv.GetValueKind() == JsonValueKind.String:
                        Apply(state, option, jv.GetValue<string>());
                        break;
                    case JsonValue jv when jv.GetValueKind() == JsonValueKind.Number:
                        Apply(state, option, jv.ToJsonString());
                        break;
                    case JsonObject obj:
                        Apply(state, option, obj.ToJsonString());
                        break;
                    default:
                        throw new CommandLineException($"--config {path}: '{key}' has a value of the wrong type");
                }
            }
        }
    }

    private sealed class ParseState
    {
        public bool Help;
        public bool Version;
        public bool Daemonize;
        public string? PidFile;
        public string? LogFile;
        public LogLevel? LogLevel;
        public LogFormat LogFormat;
        public int QmpMaxSessions = QmpServer.DefaultMaxSessionsPerListener;
        public readonly List<StartupCommand> Commands = [];
        public readonly Dictionary<string, ChardevSpec> Chardevs = new(StringComparer.Ordinal);
        public readonly HashSet<string> UsedChardevs = new(StringComparer.Ordinal);
        public readonly List<MonitorSpec> Monitors = [];
        public readonly List<string> Warnings = [];

        public DaemonOptions Build() => new()
        {
            StartupCommands = Commands,
            Monitors = Monitors,
            Warnings = Warnings,
            PidFile = PidFile,
            Daemonize = Daemonize,
            LogFile = LogFile,
            LogLevel = LogLevel,
            LogFormat = LogFormat,
            QmpMaxSessions = QmpMaxSessions,
            ShowHelp = Help,
            ShowVersion = Version,
        };
    }
}
