using System.Runtime.InteropServices;

namespace Backup.Block.Posix;

/// <summary>
/// The file descriptors that client connections (QMP and NBD, every listener) may hold together: the
/// process's RLIMIT_NOFILE less a reserve for everything else (images, log files, listeners, the
/// runtime). A listener takes a slot before accept(2) and the connection gives it back when it closes,
/// so a flood of clients waits in the listen backlog instead of driving the process to EMFILE, where
/// opening an image or starting a runtime thread would fail. With the usual hard limit (2^19 or more,
/// which .NET raises the soft limit to) the budget is far above anything else that bounds connections.
/// </summary>
public sealed class ConnectionBudget : IDisposable
{
    /// <summary>Descriptors kept for everything that is not a client connection, at the least.</summary>
    public const int MinReserve = 64;

    private readonly SemaphoreSlim _slots;

    public ConnectionBudget(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        Capacity = capacity;
        _slots = new SemaphoreSlim(capacity, capacity);
    }

    /// <summary>The one budget of this process, sized from its open-file limit.</summary>
    public static ConnectionBudget Process { get; } = new(FromLimit(OpenFileLimit(), OpenNow()));

    public int Capacity { get; }

    public int Available => _slots.CurrentCount;

    /// <summary>Waits for a slot; the caller gives it back with <see cref="Release"/> when its connection closes.</summary>
    public Task TakeAsync(CancellationToken cancellationToken) => _slots.WaitAsync(cancellationToken);

    public void Release() => _slots.Release();

    public void Dispose() => _slots.Dispose();

    /// <summary>
    /// What the limit leaves once the descriptors open now (inherited ones included: a parent that leaks
    /// a hundred into us is not rare) and a reserve of an eighth of the limit, at least
    /// <see cref="MinReserve"/>, are set aside.
    /// </summary>
    public static int FromLimit(long limit, int openNow)
    {
        var reserve = Math.Max(MinReserve, limit / 8);
        return (int)Math.Clamp(limit - openNow - reserve, 16, int.MaxValue);
    }

    private static int OpenNow()
    {
        try
        {
            return Directory.GetFiles("/proc/self/fd").Length;
        }
        catch (IOException)
        {
            return 0;
        }
    }

    private const int RLIMIT_NOFILE = 7;

    private static long OpenFileLimit()
    {
        var limits = new ulong[2];
        // rlim_cur first; RLIM_INFINITY (all ones) reads as "no limit worth counting".
        return GetRLimit(RLIMIT_NOFILE, limits) == 0 ? (long)Math.Min(limits[0], int.MaxValue) : 1024;
    }

#pragma warning disable SYSLIB1054, CA5392 // plain blittable signature; libc is resolved by the runtime
    [DllImport("libc", EntryPoint = "getrlimit", SetLastError = true)]
    private static extern int GetRLimit(int resource, [Out] ulong[] limits);
#pragma warning restore SYSLIB1054, CA5392
}
