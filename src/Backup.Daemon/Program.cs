using System.Runtime.InteropServices;
using Backup.Block;
using Backup.Daemon.CommandLine;
using Backup.Daemon.Hosting;
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
using Microsoft.Extensions.Logging;
using Serilog;
using Serilog.Events;

namespace Backup.Daemon;

internal static class Program
{
    private static async Task<int> Main(string[] args)
    {
        DaemonOptions options;
        try
        {
            options = new CommandLineParser(SchemaLoader.Default).Parse(args);
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

        using var host = BuildHost(options);
        // Signals count from the first moment, not only once the host runs: start-up binds sockets that a
        // client (and its SIGTERM) may reach before then.
        var lifetime = host.Services.GetRequiredService<IHostApplicationLifetime>();
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; lifetime.StopApplication(); });
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; lifetime.StopApplication(); });
        using var sighup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, c => { c.Cancel = true; lifetime.StopApplication(); });
        try
        {
            await host.Services.GetRequiredService<BackupDaemon>().InitializeAsync(CancellationToken.None).ConfigureAwait(false);
            await host.StartAsync().ConfigureAwait(false);
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
        builder.Logging.SetMinimumLevel(EffectiveLogLevel(options));
        builder.Logging.AddSerilog(CreateLogger(options), dispose: true);
        builder.Services.Configure<ConsoleLifetimeOptions>(o => o.SuppressStatusMessages = true);
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(30));
        builder.Services.AddSingleton<IHostLifetime, ConsoleLifetime>();

        var services = builder.Services;
        services.AddSingleton(options);
        services.AddSingleton(SchemaLoader.Default);
        services.AddSingleton(VersionInfo.Current);
        services.AddSingleton(sp =>
        {
            var graph = BlockGraph.CreateDefault();
            var log = sp.GetRequiredService<ILoggerFactory>().CreateLogger("Backup.Block");
            graph.CloseFailed = (node, e) =>
                log.LogError("node '{Node}' closed with an error; its image may have leaked clusters: {Error}", node, e.Message);
            return graph;
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
            () => sp.GetRequiredService<IEventSink>(), sp.GetService<ILogger<NbdServer>>()));
        services.AddSingleton<ICommandModule, NbdCommands>();
        services.AddSingleton<ICommandModule, ObjectCommands>();
        services.AddSingleton(sp => new JobManager(() => sp.GetRequiredService<IEventSink>()));
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

    /// <summary>Quiet like QSD unless asked (warnings and errors only); the demo run tells what it does.</summary>
    private static LogLevel EffectiveLogLevel(DaemonOptions options) =>
        options.LogLevel ?? (options.DemoMode ? LogLevel.Information : LogLevel.Warning);

    private static Serilog.Core.Logger CreateLogger(DaemonOptions options)
    {
        var level = EffectiveLogLevel(options) switch
        {
            LogLevel.Trace => LogEventLevel.Verbose,
            LogLevel.Debug => LogEventLevel.Debug,
            LogLevel.Information => LogEventLevel.Information,
            LogLevel.Warning => LogEventLevel.Warning,
            _ => LogEventLevel.Error,
        };
        const string template = "{Timestamp:yyyy-MM-dd HH:mm:ss.fff} [{Level:u3}] {SourceContext}: {Message:lj}{NewLine}{Exception}";
        var config = new LoggerConfiguration()
            .MinimumLevel.Is(level)
            .Enrich.FromLogContext()
            .WriteTo.Console(outputTemplate: template, standardErrorFromLevel: LogEventLevel.Verbose, formatProvider: System.Globalization.CultureInfo.InvariantCulture);
        if (options.LogFile is { } file)
        {
            config = config.WriteTo.File(file, outputTemplate: template, formatProvider: System.Globalization.CultureInfo.InvariantCulture);
        }
        return config.CreateLogger();
    }
}
