using System.Diagnostics;
using System.Runtime.InteropServices;

namespace Backup.Daemon.Hosting;

/// <summary>
/// --daemonize: .NET cannot fork, so the parent starts a copy of itself without --daemonize, waits
/// until that child reports it is ready (or fails), and exits with status 0 (or the child's status),
/// as QSD's parent does. The child leaves the terminal's session.
/// </summary>
public static partial class Daemonizer
{
    public static async Task<int> RunParentAsync(IReadOnlyList<string> args)
    {
        var psi = new ProcessStartInfo(Environment.ProcessPath!)
        {
            UseShellExecute = false,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
        };
        if (Path.GetFileNameWithoutExtension(Environment.ProcessPath!) == "dotnet")
        {
            // The entry assembly beside the host (Assembly.Location is empty in a single-file or native build).
            psi.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, typeof(Daemonizer).Assembly.GetName().Name + ".dll"));
        }
        foreach (var a in args.Where(a => a != "--daemonize"))
        {
            psi.ArgumentList.Add(a);
        }
        psi.Environment[ReadinessReporter.DaemonChildVariable] = "1";
        using var child = Process.Start(psi)!;
        child.StandardInput.Close();
        // Until the child is ready its errors are ours to show; afterwards it has no terminal (QSD: /dev/null).
        var errors = PumpAsync(child.StandardError, Console.Error);
        string? line;
        while ((line = await child.StandardOutput.ReadLineAsync().ConfigureAwait(false)) is not null)
        {
            if (line == ReadinessReporter.ReadyLine)
            {
                return 0;
            }
            Console.Out.WriteLine(line);
        }
        await child.WaitForExitAsync().ConfigureAwait(false);
        await errors.ConfigureAwait(false);
        return child.ExitCode == 0 ? 1 : child.ExitCode;
    }

    private static async Task PumpAsync(StreamReader from, TextWriter to)
    {
        while (await from.ReadLineAsync().ConfigureAwait(false) is { } line)
        {
            await to.WriteLineAsync(line).ConfigureAwait(false);
        }
    }

    /// <summary>In the child: a session of its own, so the terminal's hang-up does not reach it.</summary>
    public static void DetachFromTerminal() => _ = SetSid();

#pragma warning disable SYSLIB1054, CA5392
    [DllImport("libc", EntryPoint = "setsid")]
    private static extern int SetSid();
#pragma warning restore SYSLIB1054, CA5392
}
