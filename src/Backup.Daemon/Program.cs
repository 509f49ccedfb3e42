using System.Runtime.InteropServices;
using Backup.Block;
using Backup.Block.Objects;
using Backup.Daemon.CommandLine;
using Backup.Daemon.Hosting;
using Backup.Daemon.Logging;
using Backup.Diagnostics;
using Backup.Diagnostics.QemuIo;
using Backup.Jobs;
using Backup.Jobs.Commands;
using Backup.Nbd.Commands;
using Backup.Nbd.Server;
using Backup.Qmp;
using Backup.Qmp.Commands;
using Backup.Qmp.Schema;
using Backup.Qmp.Server;
using Backup.Qmp.Transactions;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Hosting.Internal;
using Microsoft.Extensions.Hosting.Systemd;
using Microsoft.Extensions.Logging;
using Serilog;

namespace Backup.Daemon;

internal static class Program
{
    private static async Task<int> Main(string[] args)
    {
        StartupTrace.Mark("main");
        TerminationSignals.StopIgnoringThem();
        DaemonOptions options;
        try
        {
            var schema = SchemaLoader.Default;
            StartupTrace.Mark("schema");
            options = new CommandLineParser(schema).Parse(args);
        }
        catch (CommandLineException e)
        {
            await Console.Error.WriteLineAsync("backupd: " + e.Message).ConfigureAwait(false);
            return 1;
        }
        foreach (var warning in options.Warnings)
        {
            await Console.Error.WriteLineAsync("backupd: " + warning).ConfigureAwait(false);
        }
        if (options.ShowHelp)
        {
            Console.Out.Write(HelpText.Text);
            return 0;
        }
        if (options.ShowVersion)
        {
            Console.Out.WriteLine($"backupd version {VersionInfo.ProductVersion} (qemu-storage-daemon {VersionInfo.Current.Major}.{VersionInfo.Current.Minor} compatible)");
            return 0;
        }
        if (options.Daemonize && !ReadinessReporter.IsDaemonChild)
        {
            return await Daemonizer.RunParentAsync(args).ConfigureAwait(false);
        }
        if (ReadinessReporter.IsDaemonChild)
        {
            Daemonizer.DetachFromTerminal();
        }

        StartupTrace.Mark("command-line");
        using var host = BuildHost(options);
        StartupTrace.Mark("host-built");
        // Signals count from the first moment, not only once the host runs: start-up binds sockets that a
        // client (and its SIGTERM) may reach before then.
        var lifetime = host.Services.GetRequiredService<IHostApplicationLifetime>();
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; lifetime.StopApplication(); });
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; lifetime.StopApplication(); });
        using var sighup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, c => { c.Cancel = true; lifetime.StopApplication(); });
        try
        {
            var daemon = host.Services.GetRequiredService<BackupDaemon>();
            StartupTrace.Mark("services-resolved");
            await daemon.InitializeAsync(CancellationToken.None).ConfigureAwait(false);
            StartupTrace.Mark("initialized");
            await host.StartAsync().ConfigureAwait(false);
            StartupTrace.Mark("host-started");
        }
        catch (StartupException e)
        {
            await Console.Error.WriteLineAsync("backupd: " + e.Message).ConfigureAwait(false);
            return 1;
        }
        catch (OperationCanceledException) when (lifetime.ApplicationStopping.IsCancellationRequested)
        {
            // A signal (or quit) between start-up and the host's start: the host refuses to start, so
            // stop here exactly as a later signal would — every node flushed and closed, sockets removed.
            await host.Services.GetRequiredService<BackupDaemon>().StopAsync(CancellationToken.None).ConfigureAwait(false);
            return 0;
        }
        await host.WaitForShutdownAsync().ConfigureAwait(false);
        return 0;
    }

    private static IHost BuildHost(DaemonOptions options)
    {
        var builder = Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { DisableDefaults = true, Args = [] });
        builder.Logging.ClearProviders();
        builder.Logging.SetMinimumLevel(DaemonLogging.EffectiveLevel(options));
        builder.Services.AddSerilog(DaemonLogging.CreateLogger(options), dispose: true);
        builder.Services.Configure<ConsoleLifetimeOptions>(o => o.SuppressStatusMessages = true);
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(30));
        builder.Services.AddSingleton<IHostLifetime, ConsoleLifetime>();
        AddServiceManagerNotification(builder.Services);

        var services = builder.Services;
        services.AddSingleton(options);
        services.AddSingleton(SchemaLoader.Default);
        services.AddSingleton(VersionInfo.Current);
        services.AddSingleton(sp => new BlockGraph(BuiltinDrivers.All)
        {
            Logger = sp.GetRequiredService<ILogger<BlockGraph>>(),
            Objects = sp.GetRequiredService<ObjectRegistry>(),
        });
        services.AddSingleton<ObjectRegistry>();
        services.AddSingleton<IShutdownRequester, HostShutdownRequester>();
        services.AddSingleton<ICommandModule, ControlCommands>();
        services.AddSingleton<ICommandModule, BlockCoreCommands>();
        services.AddSingleton<BitmapCommands>();
        services.AddSingleton<ICommandModule>(sp => sp.GetRequiredService<BitmapCommands>());
        services.AddSingleton<ITransactionActionModule>(sp => sp.GetRequiredService<BitmapCommands>());
        services.AddSingleton<ICommandModule, TransactionCommands>();
        services.AddSingleton<IQemuIoConsole, StdioConsole>();
        services.AddSingleton<AioRequests>();
        services.AddSingleton<QemuIoInterpreter>();
        services.AddSingleton<ICommandModule, HumanMonitorCommand>();
        services.AddSingleton(sp => new NbdServer(sp.GetRequiredService<BlockGraph>(),
            () => sp.GetRequiredService<IEventSink>(), sp.GetService<ILogger<NbdServer>>())
        {
            Objects = sp.GetRequiredService<ObjectRegistry>(),
        });
        services.AddSingleton<ICommandModule, NbdCommands>();
        services.AddSingleton<ICommandModule, ObjectCommands>();
        services.AddSingleton(sp => new JobManager(() => sp.GetRequiredService<IEventSink>(), sp.GetRequiredService<ILogger<JobManager>>()));
        services.AddSingleton<BackupStarter>();
        services.AddSingleton<ICommandModule, JobCommands>();
        services.AddSingleton<ICommandModule, BackupCommands>();
        services.AddSingleton<ICommandModule, CreateCommands>();
        services.AddSingleton<ITransactionActionModule, BackupTransactionActions>();
        services.AddSingleton<QmpDispatcher>();
        services.AddSingleton(sp => new QmpServer(sp.GetRequiredService<QmpDispatcher>(), sp.GetRequiredService<VersionInfo>(),
            sp.GetRequiredService<ILoggerFactory>().CreateLogger("Backup.Qmp"))
        {
            MaxSessionsPerListener = options.QmpMaxSessions,
        });
        services.AddSingleton<IEventSink>(sp => sp.GetRequiredService<QmpServer>());
        services.AddSingleton<DemoSetup>();
        services.AddSingleton<ReadinessReporter>();
        services.AddSingleton<BackupDaemon>();
        services.AddHostedService(sp => sp.GetRequiredService<BackupDaemon>());
        return builder.Build();
    }

    /// <summary>
    /// Under systemd (Type=notify) the host tells the service manager READY=1 once it has started — after
    /// start-up has opened every QMP listener — and STOPPING=1 when it begins to stop. UseSystemd's test is
    /// "my parent is systemd"; sd_notify's is only NOTIFY_SOCKET, which also serves supervisors that speak
    /// the protocol and `systemd-run`-less tests, so either turns it on.
    /// </summary>
    private static void AddServiceManagerNotification(IServiceCollection services)
    {
        services.AddSystemd();
        if (!SystemdHelpers.IsSystemdService() && Environment.GetEnvironmentVariable("NOTIFY_SOCKET") is { Length: > 0 })
        {
            services.AddSingleton<ISystemdNotifier, SystemdNotifier>();
            services.AddSingleton<IHostLifetime, SystemdLifetime>();
        }
    }
}
