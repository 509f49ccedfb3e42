using BenchmarkDotNet.Running;

namespace Backup.Benchmarks;

/// <summary>
/// Runs the suites. Example (short job, as recorded in docs/performance-bitmaps.md):
/// <c>dotnet run -c Release --project tests/Backup.Benchmarks -- --filter '*HBitmap*' --job short</c>.
/// </summary>
internal static class Program
{
    private static void Main(string[] args) =>
        BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
}
