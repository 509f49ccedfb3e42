using System.Diagnostics;
using System.Globalization;
using System.Runtime;

namespace Backup.Daemon.Hosting;

/// <summary>
/// Start-up phases on stderr when BACKUPD_STARTUP_TRACE=1: wall clock (Unix seconds, so a harness can
/// subtract its own exec time), time since Main, and the JIT's count and time so far — where the
/// time to a QMP-ready socket goes. Off, a mark costs one static bool test.
/// </summary>
internal static class StartupTrace
{
    public const string Variable = "BACKUPD_STARTUP_TRACE";

    private static readonly bool Enabled = Environment.GetEnvironmentVariable(Variable) == "1";
    private static readonly long MainTimestamp = Stopwatch.GetTimestamp();

    public static void Mark(string phase)
    {
        if (!Enabled)
        {
            return;
        }
        var unix = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0;
        var sinceMain = Stopwatch.GetElapsedTime(MainTimestamp).TotalMilliseconds;
        Console.Error.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"startup-trace {phase} unix={unix:F3} main+{sinceMain:F1}ms jit-methods={JitInfo.GetCompiledMethodCount()} jit-ms={JitInfo.GetCompilationTime().TotalMilliseconds:F1}"));
    }
}
