using System.Runtime.InteropServices;

namespace Backup.Daemon.Hosting;

/// <summary>
/// SIGINT, SIGHUP and SIGTERM stop the daemon whoever started it. A shell that starts a job with `&amp;`
/// without job control sets SIGINT (and nohup SIGHUP) to ignored at exec, and .NET keeps an ignored
/// signal ignored even when a handler is registered for it. QSD installs its own handlers for these
/// three regardless (QEMU's os_setup_signal_handling), so `kill -INT` stops it: backupd puts their
/// default disposition back first, before the runtime installs its handlers, to behave the same.
/// </summary>
internal static partial class TerminationSignals
{
    private const int SigHup = 1;
    private const int SigInt = 2;
    private const int SigTerm = 15;

    /// <summary>Call first thing in Main, before anything touches Console, Process or signal registration.</summary>
    public static void StopIgnoringThem()
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }
        foreach (var signal in (ReadOnlySpan<int>)[SigHup, SigInt, SigTerm])
        {
            _ = Signal(signal, IntPtr.Zero); // SIG_DFL
        }
    }

#pragma warning disable SYSLIB1054, CA5392
    [DllImport("libc", EntryPoint = "signal")]
    private static extern IntPtr Signal(int signum, IntPtr handler);
#pragma warning restore SYSLIB1054, CA5392
}
