using System.Text.Json.Nodes;
using Backup.Qmp.Server;
using Microsoft.Extensions.Logging;

namespace Backup.Daemon.CommandLine;

/// <summary>
/// A command-line option that configures something QMP can also configure (--blockdev, --object,
/// --nbd-server, --export): it is checked against that command's schema when the command line is
/// read, and run through the same command at start-up, as QSD does.
/// </summary>
/// <param name="Option">The option as given (e.g. "--blockdev").</param>
/// <param name="Text">Its argument as given, for error messages.</param>
/// <param name="Command">The QMP command that carries it out.</param>
/// <param name="Arguments">The validated arguments.</param>
public sealed record StartupCommand(string Option, string Text, string Command, JsonObject Arguments);

/// <summary>A QMP monitor: where it is served, whether start-up waits for its first client, and where it was asked for.</summary>
/// <param name="Endpoint">The listener or connection.</param>
/// <param name="Wait">QEMU's <c>wait=on</c>: start-up goes on once a client has connected.</param>
/// <param name="Origin">The option that asked for it (e.g. "--chardev socket,id=m,fd=3,server=on"), for messages.</param>
/// <param name="TlsCreds">Id of the TLS credentials the monitor's connections use, if any.</param>
/// <param name="TlsAuthz">Id of the authz object that must allow each TLS client's certificate name, if any.</param>
public sealed record MonitorSpec(QmpEndpoint Endpoint, bool Wait, string Origin, string? TlsCreds = null, string? TlsAuthz = null);

/// <summary>Everything the command line (or --config) asked for, checked and ready to apply.</summary>
public sealed record DaemonOptions
{
    public IReadOnlyList<StartupCommand> StartupCommands { get; init; } = [];
    /// <summary>The QMP monitors, in command-line order (--monitor, then --qmp).</summary>
    public IReadOnlyList<MonitorSpec> Monitors { get; init; } = [];

    public IReadOnlyList<QmpEndpoint> QmpEndpoints => Monitors.Select(m => m.Endpoint).ToList();

    /// <summary>Warnings to print before start-up, in QEMU's words (deprecated option forms).</summary>
    public IReadOnlyList<string> Warnings { get; init; } = [];
    public string? PidFile { get; init; }
    public bool Daemonize { get; init; }
    public string? LogFile { get; init; }
    /// <summary>Null: the default (warnings, or information in the demo run).</summary>
    public LogLevel? LogLevel { get; init; }
    public LogFormat LogFormat { get; init; }
    /// <summary>QMP sessions each monitor serves at once (--qmp-max-sessions); more clients wait to be accepted.</summary>
    public int QmpMaxSessions { get; init; } = QmpServer.DefaultMaxSessionsPerListener;

    public bool ShowHelp { get; init; }
    public bool ShowVersion { get; init; }

    /// <summary>No options at all: run on the embedded default (two demo disks under a local state folder).</summary>
    public bool DemoMode { get; init; }
}

/// <summary>How log events are written: lines for people, or compact JSON (CLEF) for log shippers.</summary>
public enum LogFormat
{
    Text,
    Json,
}

/// <summary>A bad command line: one line naming the option and the problem; the daemon exits 1.</summary>
public sealed class CommandLineException(string message) : Exception(message)
{
    public CommandLineException() : this("bad command line") { }

    public CommandLineException(string message, Exception inner) : this(message + ": " + inner.Message) { }
}
