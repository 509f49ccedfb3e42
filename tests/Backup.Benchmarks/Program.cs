using BenchmarkDotNet.Running;

namespace Backup.Benchmarks;

/// <summary>
/// Runs the suites. Example (short job, as recorded in docs/performance-bitmaps.md):
/// <c>dotnet run -c Release --project tests/Backup.Benchmarks -- --filter '*HBitmap*' --job short</c>;
/// <c>--filter '*Qcow2*'</c> for the qcow2 suite (images in <c>$BACKUPD_BENCH_DIR</c>). The daemon-level
/// scripts (NBD export vs qemu-storage-daemon) are in <c>scripts/</c>; docs/performance.md has the method.
/// </summary>
internal static class Program
{
    private static void Main(string[] args) =>
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
}
