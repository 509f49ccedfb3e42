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
/// forms (--qmp, --config, --log-file, --log-level). Everything is checked here, before anything is
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
        "--chardev", "--monitor", "--pidfile", "--qmp", "--config", "--log-file", "--log-level", "-T", "--trace",
    };

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
            string option;
            string? value = null;
            var eq = arg.StartsWith("--", StringComparison.Ordinal) ? arg.IndexOf('=', StringComparison.Ordinal) : -1;
            if (eq > 0)
            {
                option = arg[..eq];
                value = arg[(eq + 1)..];
            }
            else
            {
                option = arg;
            }
            var takesValue = ValueOptions.Contains(option) || (CommandOptions.TryGetValue(option, out var co) && schema.Commands.ContainsKey(co.Command));
            if (takesValue && value is null)
            {
                if (i + 1 >= args.Count)
                {
                    throw new CommandLineException($"option '{option}' requires an argument");
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
                state.Endpoints.Add(ParseQmpAddress(value!));
                return;
            case "--config":
                ApplyConfig(state, value!);
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
        JsonObject o;
        try
        {
            o = KeyValueSyntax.Parse(text, "backend");
        }
        catch (BlockException e)
        {
            throw new CommandLineException($"--chardev {text}: {e.Message}");
        }
        string? Get(string k) => o[k]?.GetValue<string>();
        var fail = (string m) => new CommandLineException($"--chardev {text}: {m}");
        var id = Get("id") ?? throw fail("Parameter 'id' is missing");
        if (Get("backend") is var backend && backend != "socket")
        {
            throw fail($"chardev backend '{backend}' is not supported: backupd serves QMP on 'socket' chardevs only");
        }
        foreach (var (key, _) in o)
        {
            if (key is not ("backend" or "id" or "path" or "host" or "port" or "server" or "wait" or "nodelay" or "ipv4" or "ipv6" or "abstract"))
            {
                throw fail($"Invalid parameter '{key}'");
            }
        }
        if (Get("server") is not ("on" or "yes" or "true" or "y"))
        {
            throw fail("backupd only listens: give 'server=on'");
        }
        if (Get("wait") is not (null or "off" or "no" or "false" or "n"))
        {
            throw fail("'wait=on' is not supported: give 'wait=off'");
        }
        QmpEndpoint endpoint;
        if (Get("path") is { } path)
        {
            endpoint = new QmpEndpoint.Unix(path);
        }
        else if (Get("host") is { } host && Get("port") is { } port)
        {
            endpoint = new QmpEndpoint.Tcp(host, ParsePort(port, fail));
        }
        else if (Get("port") is { } onlyPort)
        {
            endpoint = new QmpEndpoint.Tcp("0.0.0.0", ParsePort(onlyPort, fail));
        }
        else
        {
            throw fail("chardev: socket: no host given");
        }
        if (!state.Chardevs.TryAdd(id, new ChardevSpec(id, endpoint)))
        {
            throw fail($"attempt to add duplicate property '{id}' to object (type 'container')");
        }
    }

    private static int ParsePort(string port, Func<string, CommandLineException> fail) =>
        int.TryParse(port, NumberStyles.None, CultureInfo.InvariantCulture, out var p) && p <= 65535
            ? p
            : throw fail($"Parameter 'port' expects a port number, not '{port}'");

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
            var ok = key switch
            {
                "chardev" or "id" => true,
                "mode" => s == "control",
                "pretty" => s is "on" or "off",
                _ => false,
            };
            if (!ok)
            {
                throw new CommandLineException(key == "mode"
                    ? $"--monitor {text}: Only 'mode=control' is supported"
                    : $"--monitor {text}: Invalid parameter '{key}'");
            }
        }
        var chardev = o["chardev"]?.GetValue<string>() ?? throw new CommandLineException($"--monitor {text}: Parameter 'chardev' is missing");
        state.Monitors.Add((chardev, text));
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

    /// <summary>
    /// --config FILE: a JSON object with the same settings as the command line. Keys are option names
    /// without dashes; repeatable options take a list; command options accept JSON objects or strings.
    /// </summary>
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
        public readonly List<StartupCommand> Commands = [];
        public readonly Dictionary<string, ChardevSpec> Chardevs = new(StringComparer.Ordinal);
        public readonly List<(string Chardev, string Text)> Monitors = [];
        public readonly List<QmpEndpoint> Endpoints = [];

        public DaemonOptions Build()
        {
            var endpoints = new List<QmpEndpoint>();
            var used = new HashSet<string>(StringComparer.Ordinal);
            foreach (var (chardev, text) in Monitors)
            {
                if (!Chardevs.TryGetValue(chardev, out var spec))
                {
                    throw new CommandLineException($"--monitor {text}: chardev \"{chardev}\" not found");
                }
                if (!used.Add(chardev))
                {
                    throw new CommandLineException($"--monitor {text}: chardev \"{chardev}\" is already used by another monitor");
                }
                endpoints.Add(spec.Endpoint);
            }
            endpoints.AddRange(Endpoints);
            return new DaemonOptions
            {
                StartupCommands = Commands,
                QmpEndpoints = endpoints,
                PidFile = PidFile,
                Daemonize = Daemonize,
                LogFile = LogFile,
                LogLevel = LogLevel,
                ShowHelp = Help,
                ShowVersion = Version,
            };
        }
    }
}
