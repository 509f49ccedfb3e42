using System.Diagnostics;

namespace Backup.Tests.Fuzzing;

/// <summary>
/// How long and from which seed the fuzzers run. The normal test run gives each a few seconds from a
/// fresh seed (printed, so a failure can be replayed); nightly runs set BACKUPD_FUZZ_SECONDS (say 600)
/// and, to replay, BACKUPD_FUZZ_SEED. docs/reliability.md records the counts. Linked into every test
/// project that fuzzes, with <see cref="WellBehavedClient"/>.
/// </summary>
internal static class FuzzSettings
{
    public static TimeSpan Duration =>
        TimeSpan.FromSeconds(double.TryParse(Environment.GetEnvironmentVariable("BACKUPD_FUZZ_SECONDS"), out var s) && s > 0 ? s : 3);

    public static int Seed =>
        int.TryParse(Environment.GetEnvironmentVariable("BACKUPD_FUZZ_SEED"), out var seed) ? seed : Random.Shared.Next();

    /// <summary>Managed memory after a full, compacting collection: what a fuzz run must give back.</summary>
    public static long ManagedMemory()
    {
        GC.Collect(GC.MaxGeneration, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        return GC.GetTotalMemory(forceFullCollection: true);
    }
}

/// <summary>The client that must keep being served while a fuzzer hammers the server next to it.</summary>
internal static class WellBehavedClient
{
    /// <summary>
    /// Runs <paramref name="round"/> (one request and its checked reply; its argument counts the rounds)
    /// with <paramref name="pause"/> between rounds until <paramref name="stop"/>; returns how many were
    /// served and the slowest.
    /// </summary>
    public static async Task<(int Served, TimeSpan Worst)> RunAsync(Func<int, Task> round, TimeSpan pause, CancellationToken stop)
    {
        var served = 0;
        var worst = TimeSpan.Zero;
        while (!stop.IsCancellationRequested)
        {
            var t = Stopwatch.StartNew();
            await round(served);
            worst = t.Elapsed > worst ? t.Elapsed : worst;
            served++;
            try
            {
                await Task.Delay(pause, stop);
            }
            catch (OperationCanceledException)
            {
                break;
            }
        }
        return (served, worst);
    }
}
