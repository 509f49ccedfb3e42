using BenchmarkDotNet.Running;

namespace Backup.Benchmarks;

/// <summary>
/// Runs the suites. Example (short job, as recorded in docs/performance-bitmaps.md):
/// <c>dotnet run -c Release --project tests/Backup.Benchmarks -- --filter '*HBitmap*' --job short</c>;
/// <c>--filter '*Qcow2*'</c> for the qcow2 suite (images in <c>$BACKUPD_BENCH_DIR</c>). The daemon-level
/// scripts (NBD export vs qemu-storage-daemon) are in <c>scripts/</c>; docs/performance.md has the method.
/// <c>-- qcow2-side-by-side ROUNDS DIR [direct]</c> runs <see cref="Qcow2SideBySide"/> instead.
/// </summary>
internal static class Program
{
    private static async Task Main(string[] args)
    {
        if (args is ["qcow2-side-by-side", var rounds, var dir, ..])
        {
            // Alternating raw/qcow2 rounds with medians (see Qcow2SideBySide); "direct" as a fourth argument for O_DIRECT.
            await Qcow2SideBySide.RunAsync(int.Parse(rounds, System.Globalization.CultureInfo.InvariantCulture), dir,
                direct: args is [_, _, _, "direct", ..]);
            return;
        }
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
    }
}
