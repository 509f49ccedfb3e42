using Backup.Daemon.CommandLine;
using Backup.Qmp.Server;

namespace Backup.Daemon.Hosting;

/// <summary>
/// Tells whoever started the daemon that it is ready: the demo run prints its socket on stdout; a
/// daemonized child tells its parent through stdout, then stops using it.
/// </summary>
public sealed class ReadinessReporter(DaemonOptions options)
{
    /// <summary>Set in the environment of the child that --daemonize starts.</summary>
    public const string DaemonChildVariable = "BACKUPD_DAEMONIZED";

    public const string ReadyLine = "backupd-ready";

    private readonly List<QmpEndpoint> _endpoints = [];

    public static bool IsDaemonChild => Environment.GetEnvironmentVariable(DaemonChildVariable) == "1";

    public void Listening(QmpEndpoint endpoint) => _endpoints.Add(endpoint);

    public void Ready()
    {
        if (options.DemoMode)
        {
            foreach (var (node, file) in DemoSetup.Disks)
            {
                Console.Out.WriteLine($"backupd: demo disk {Path.Combine(DemoSetup.StateDirectory, file)} is node '{node}'");
            }
            foreach (var e in _endpoints)
            {
                Console.Out.WriteLine(e is QmpEndpoint.Unix u ? $"backupd: QMP socket {u.Path}" : $"backupd: QMP {e}");
            }
            Console.Out.Flush();
        }
        if (IsDaemonChild)
        {
            Console.Out.WriteLine(ReadyLine);
            Console.Out.Flush();
            // The parent is gone once it reads this: stdout and stderr lead nowhere from here on
            // (logs still reach --log-file).
            Console.SetOut(TextWriter.Null);
            Console.SetError(TextWriter.Null);
        }
    }
}
