namespace Backup.Qmp.Tests.Fuzzing;

/// <summary>
/// How long and from which seed the fuzzers run. The normal test run gives each a few seconds from a
/// fresh seed (printed, so a failure can be replayed); nightly runs set BACKUPD_FUZZ_SECONDS (say 600)
/// and, to replay, BACKUPD_FUZZ_SEED. docs/reliability.md records the counts.
/// </summary>
internal static class FuzzSettings
{
    public static TimeSpan Duration =>
        TimeSpan.FromSeconds(double.TryParse(Environment.GetEnvironmentVariable("BACKUPD_FUZZ_SECONDS"), out var s) && s > 0 ? s : 3);

    public static int Seed =>
        int.TryParse(Environment.GetEnvironmentVariable("BACKUPD_FUZZ_SEED"), out var seed) ? seed : Random.Shared.Next();
}
