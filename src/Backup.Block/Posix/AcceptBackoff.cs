using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace Backup.Block.Posix;

/// <summary>
/// What a listener does when accept(2) fails. Out of file descriptors (EMFILE, ENFILE) the pending
/// connection stays in the backlog, so the listening socket stays readable and an accept loop that
/// simply retried would spin a CPU and hog a thread-pool thread; the pool would then start thread
/// after thread, and under fd exhaustion starting a thread fails and aborts the process. So every
/// failure waits, doubling from <see cref="Initial"/> to <see cref="Max"/>, and the first success
/// resets the delay. A streak is logged once when it begins and once when it ends, not per retry.
/// </summary>
public sealed class AcceptBackoff
{
    public static readonly TimeSpan Initial = TimeSpan.FromMilliseconds(10);
    public static readonly TimeSpan Max = TimeSpan.FromSeconds(1);

    private TimeSpan _next = Initial;

    /// <summary>
    /// Starts the runtime's timer thread now. .NET starts it on first use of a timer, and starting a thread
    /// needs resources that are gone when the process is out of file descriptors (Thread.StartCore then
    /// throws OutOfMemoryException): the first Task.Delay of a backoff, or the first CancelAfter, would fail
    /// exactly when it is needed. Call when a listener starts, long before any flood.
    /// </summary>
    public static void StartRuntimeTimerThread()
    {
        if (Interlocked.Exchange(ref s_timerStarted, 1) == 0)
        {
            s_keepAlive = new Timer(static _ => { }, null, 0, Timeout.Infinite);
        }
    }

    private static int s_timerStarted;
#pragma warning disable IDE0052 // held so that the timer is not collected before it fired
    private static Timer? s_keepAlive;
#pragma warning restore IDE0052

    /// <summary>Failures since the last successful accept.</summary>
    public int Failures { get; private set; }

    /// <summary>Records a failure and returns how long to wait before accepting again.</summary>
    public TimeSpan Failed()
    {
        Failures++;
        var delay = _next;
        _next = TimeSpan.FromTicks(Math.Min(_next.Ticks * 2, Max.Ticks));
        return delay;
    }

    /// <summary>Records a success; returns the length of the streak it ended (0 if none).</summary>
    public int Succeeded()
    {
        var streak = Failures;
        Failures = 0;
        _next = Initial;
        return streak;
    }

    /// <summary>
    /// accept(2) failures that mean "the peer gave up before we got to it": retried at once, since the
    /// next pending connection can be accepted now.
    /// </summary>
    public static bool IsPeerGone(SocketException e)
    {
        ArgumentNullException.ThrowIfNull(e);
        return e.SocketErrorCode is SocketError.ConnectionAborted or SocketError.ConnectionReset or SocketError.Interrupted;
    }

    /// <summary>
    /// The failure in the kernel's words. .NET maps both EMFILE and ENFILE to
    /// <see cref="SocketError.TooManyOpenSockets"/> and words both as ENFILE ("Too many open files in
    /// system"), which sends an operator to the wrong limit; dup(2) tells them apart: it fails with EMFILE
    /// exactly when this process is at its own RLIMIT_NOFILE.
    /// </summary>
    public static string Describe(SocketException e)
    {
        ArgumentNullException.ThrowIfNull(e);
        if (e.SocketErrorCode != SocketError.TooManyOpenSockets)
        {
            return e.Message;
        }
        return ProcessAtFileLimit() ? "Too many open files" : "Too many open files in system";
    }

    private const int EMFILE = 24;

    private static bool ProcessAtFileLimit()
    {
        var fd = Dup(2);
        if (fd >= 0)
        {
            _ = Close(fd);
            return false;
        }
        return Marshal.GetLastPInvokeError() == EMFILE;
    }

#pragma warning disable SYSLIB1054, CA5392 // plain blittable signatures; libc is resolved by the runtime
    [DllImport("libc", EntryPoint = "dup", SetLastError = true)]
    private static extern int Dup(int fd);

    [DllImport("libc", EntryPoint = "close")]
    private static extern int Close(int fd);
#pragma warning restore SYSLIB1054, CA5392
}
