using Backup.Block;
using Backup.Daemon.CommandLine;
using Backup.Daemon.Hosting;
using Backup.Qmp;
using Backup.Qmp.Commands;
using Backup.Qmp.Schema;
using Backup.Qmp.Server;
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
        try
        {
            await host.StartAsync().ConfigureAwait(false);
        }
        catch (StartupException e)
        {
            await Console.Error.WriteLineAsync("backupd: " + e.Message).ConfigureAwait(false);
            return 1;
        }
        await host.WaitForShutdownAsync().ConfigureAwait(false);
        return 0;
    }

    private static IHost BuildHost(DaemonOptions options)
    {
        var builder = Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { DisableDefaults = true, Args = [] });
        builder.Logging.ClearProviders();
        builder.Logging.SetMinimumLevel(options.LogLevel);
        builder.Logging.AddSerilog(CreateLogger(options), dispose: true);
        builder.Services.Configure<ConsoleLifetimeOptions>(o => o.SuppressStatusMessages = true);
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(30));
        builder.Services.AddSingleton<IHostLifetime, ConsoleLifetime>();

        var services = builder.Services;
        services.AddSingleton(options);
        services.AddSingleton(SchemaLoader.Default);
        services.AddSingleton(VersionInfo.Current);
        services.AddSingleton(_ => BlockGraph.CreateDefault());
        services.AddSingleton<ObjectRegistry>();
        services.AddSingleton<IShutdownRequester, HostShutdownRequester>();
        services.AddSingleton<ICommandModule, ControlCommands>();
        services.AddSingleton<ICommandModule>(sp => new BlockCoreCommands(sp.GetRequiredService<BlockGraph>(), sp.GetServices<INodeInfoContributor>()));
        services.AddSingleton<ICommandModule, ObjectCommands>();
        services.AddSingleton<QmpDispatcher>();
        services.AddSingleton(sp => new QmpServer(sp.GetRequiredService<QmpDispatcher>(), sp.GetRequiredService<VersionInfo>(),
            sp.GetRequiredService<ILoggerFactory>().CreateLogger("Backup.Qmp")));
        services.AddSingleton<IEventSink>(sp => sp.GetRequiredService<QmpServer>());
        services.AddSingleton<DemoSetup>();
        services.AddSingleton<ReadinessReporter>();
        services.AddHostedService<BackupDaemon>();
        return builder.Build();
    }

    private static Serilog.Core.Logger CreateLogger(DaemonOptions options)
    {
        var level = options.LogLevel switch
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
