using System.Globalization;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Objects;
using Backup.Block.Security;
using Backup.Daemon.CommandLine;
using Backup.Nbd.Commands;
using Backup.Nbd.Server;
using Backup.Qmp;
using Backup.Qmp.Commands;
using Backup.Qmp.Logging;
using Backup.Qmp.Server;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace Backup.Daemon.Hosting;

/// <summary>A start-up step failed; the message is the one line the user sees before exit status 1.</summary>
public sealed class StartupException(string message) : Exception(message)
{
    public StartupException() : this("start-up failed") { }

    public StartupException(string message, Exception inner) : this(message + ": " + inner.Message) { }
}

/// <summary>
/// The daemon's life: at start, the command line's nodes, objects and listeners are set up in order
/// (through the same QMP commands a client would use), then the pid file is written and readiness
/// reported; at stop (SIGTERM, SIGINT, quit), listeners close and their sockets are removed, and
/// every node is flushed and closed.
/// </summary>
public sealed class BackupDaemon(
    DaemonOptions options,
    BlockGraph graph,
    QmpDispatcher dispatcher,
    QmpServer server,
    NbdServer nbd,
    Backup.Jobs.JobManager jobs,
    DemoSetup demo,
    ReadinessReporter readiness,
    ObjectRegistry objects,
    ILogger<BackupDaemon> logger) : IHostedService
{
    private bool _pidFileWritten;

    /// <summary>
    /// Sets up what the command line asked for. Runs before the host starts so that a failure is one
    /// line from Program and exit status 1, with whatever was already opened closed again.
    /// </summary>
    public async Task InitializeAsync(CancellationToken cancellationToken)
    {
        try
        {
            var commands = options.StartupCommands;
            var monitors = options.Monitors;
            if (options.DemoMode)
            {
                IReadOnlyList<QmpEndpoint> demoEndpoints;
                (commands, demoEndpoints) = demo.Prepare();
                monitors = demoEndpoints.Select(e => new MonitorSpec(e, Wait: false, "--qmp " + e)).ToList();
            }
            foreach (var c in commands)
            {
                logger.LogDebug("start-up: {Option} → {Command} {Arguments}", c.Option, c.Command, CommandLog.Arguments(c.Command, c.Arguments));
                try
                {
                    if (c.Option == "--nbd-server")
                    {
                        NbdCommands.StartFromOptions(nbd, c.Arguments);
                    }
                    else
                    {
                        await dispatcher.ExecuteAsync(c.Command, c.Arguments, new CommandContext(null), cancellationToken).ConfigureAwait(false);
                    }
                }
                catch (BlockException e)
                {
                    // Like QSD, a hint (e.g. which image is locked) goes on the next line.
                    var hint = e.Hint is { } h ? Environment.NewLine + h : "";
                    throw new StartupException($"{c.Option} {c.Text}: {e.Message}{hint}");
                }
            }
            if (options.PidFile is { } pidFile)
            {
                // Before the sockets: whoever waits for a socket may rely on the pid file being there.
                WritePidFile(pidFile);
            }
            foreach (var m in monitors)
            {
                Task firstClient;
                try
                {
                    // The command line's objects exist by now, wherever --object stood (QSD needs it before --chardev).
                    var tls = m.TlsCreds is { } credsId
                        ? new TlsServerPolicy(TlsCredentials.Find(objects, credsId, m.Endpoint.IsConnection ? TlsEndpoint.Client : TlsEndpoint.Server), m.TlsAuthz, objects)
                        : null;
                    var bound = server.Open(m.Endpoint, out firstClient, tls);
                    readiness.Listening(bound);
                }
                catch (QmpEndpointException ex)
                {
                    throw new StartupException($"{m.Origin}: {ex.Message}");
                }
                catch (BlockException ex)
                {
                    throw new StartupException($"{m.Origin}: {ex.Message}");
                }
                catch (SocketException ex)
                {
                    throw new StartupException($"{m.Origin}: Failed to bind socket to {m.Endpoint}: {ex.Message}");
                }
                if (m.Wait)
                {
                    // QEMU's wait=on: start-up (and so the pid file's last word, readiness) waits for a client.
                    await Console.Error.WriteLineAsync($"backupd: {m.Origin}: info: waiting for connection on: {m.Endpoint},server=on").ConfigureAwait(false);
                    await firstClient.WaitAsync(cancellationToken).ConfigureAwait(false);
                }
            }
            logger.LogInformation("backupd {Version} ready: {Nodes} node(s), {Listeners} QMP monitor(s)",
                VersionInfo.ProductVersion, graph.Nodes.Count, monitors.Count);
            readiness.Ready();
        }
        catch
        {
            await CleanUpAsync().ConfigureAwait(false);
            throw;
        }
    }

    public Task StartAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    public Task StopAsync(CancellationToken cancellationToken)
    {
        logger.LogInformation("shutting down");
        return CleanUpAsync();
    }

    private async Task CleanUpAsync()
    {
        // As QSD at SIGTERM: the QMP clients see BLOCK_EXPORT_DELETED for every export before they are dropped.
        await nbd.RemoveAllExportsAsync().ConfigureAwait(false);
        await server.StopAsync().ConfigureAwait(false);
        await nbd.StopAsync().ConfigureAwait(false);
        // Jobs end (cancelled, their bitmaps restored) before the nodes they use are closed.
        await jobs.CancelAllAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        try
        {
            await graph.CloseAllAsync().ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or BlockException)
        {
            logger.LogError(e, "closing the block graph failed");
        }
        if (_pidFileWritten && options.PidFile is { } pidFile)
        {
            TryDelete(pidFile);
        }
    }

    private void WritePidFile(string path)
    {
        try
        {
            var temp = path + ".tmp";
            File.Delete(temp);
            // 0600 as QSD's: created with that mode, so it never exists with a wider one.
            var create = new FileStreamOptions { Mode = FileMode.CreateNew, Access = FileAccess.Write };
            if (!OperatingSystem.IsWindows())
            {
                create.UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite;
            }
            using (var writer = new StreamWriter(temp, create))
            {
                writer.Write(Environment.ProcessId.ToString(CultureInfo.InvariantCulture) + "\n");
            }
            File.Move(temp, path, overwrite: true);
            _pidFileWritten = true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new StartupException($"--pidfile {path}: Cannot open pid file: {e.Message}");
        }
    }

    private void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            logger.LogWarning("could not remove {Path}: {Error}", path, e.Message);
        }
    }
}

/// <summary>Lets quit stop the host the same way a signal does.</summary>
public sealed class HostShutdownRequester(IHostApplicationLifetime lifetime, NbdServer nbd, ILogger<HostShutdownRequester> logger) : IShutdownRequester
{
    public async ValueTask BeforeQuitReplyAsync(CancellationToken cancellationToken) =>
        await nbd.RemoveAllExportsAsync().ConfigureAwait(false);

    public void RequestShutdown(string reason)
    {
        logger.LogInformation("shutdown requested: {Reason}", reason);
        lifetime.StopApplication();
    }
}

/// <summary>
/// The embedded default for a first run with no options: two demo disks in a local state folder (a VM
/// has several, and backups of several at one instant are what a newcomer tries), served as nodes
/// 'drive0' and 'drive1' on a QMP socket whose path is printed.
/// </summary>
public sealed class DemoSetup(ILogger<DemoSetup> logger)
{
    public const long DemoDiskSize = 1L << 30;

    /// <summary>The demo disks: node name and file name in the state folder.</summary>
    public static readonly IReadOnlyList<(string Node, string File)> Disks = [("drive0", "demo.img"), ("drive1", "demo1.img")];

    /// <summary>BACKUPD_STATE_DIR, or ./state under the current directory.</summary>
    public static string StateDirectory =>
        Path.GetFullPath(Environment.GetEnvironmentVariable("BACKUPD_STATE_DIR") is { Length: > 0 } d ? d : "state");

    public (IReadOnlyList<StartupCommand> Commands, IReadOnlyList<QmpEndpoint> Endpoints) Prepare()
    {
        var dir = StateDirectory;
        Directory.CreateDirectory(dir);
        var commands = new List<StartupCommand>();
        foreach (var (node, file) in Disks)
        {
            var disk = Path.Combine(dir, file);
            if (!File.Exists(disk))
            {
                using var f = File.Open(disk, FileMode.CreateNew, FileAccess.Write);
                f.SetLength(DemoDiskSize);
                logger.LogInformation("created demo disk {Path} ({Size} bytes, sparse)", disk, DemoDiskSize);
            }
            var args = new JsonObject
            {
                ["driver"] = "raw",
                ["node-name"] = node,
                ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = disk },
            };
            commands.Add(new StartupCommand("--blockdev", args.ToJsonString(), "blockdev-add", args));
        }
        var socket = Path.Combine(dir, "qmp.sock");
        return (commands, [new QmpEndpoint.Unix(socket)]);
    }
}
