using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;
using Backup.Nbd.Tests.Support;
using Xunit.Abstractions;

namespace Backup.Nbd.Tests;

/// <summary>
/// Throughput of this server against qemu-storage-daemon 7.2 on the same image, with the same clients.
/// Not a regular test: it runs only with NBD_PERF=1 (it takes a minute and needs an idle machine), e.g.
/// <c>NBD_PERF=1 dotnet test tests/Backup.Nbd.Tests -c Release --filter PerformanceComparison --logger "console;verbosity=detailed"</c>.
/// docs/performance-nbd.md records its output.
/// </summary>
public sealed partial class PerformanceComparison(ITestOutputHelper output)
{
    private const long ImageSize = 1L << 30;

    private static readonly (string Name, Func<string, string, string[]> Args, string Tool, long Bytes)[] Workloads =
    [
        ("4k strided writes, qemu-img bench, depth 32, 50000 ops", (uri, _) =>
            ["bench", "-f", "raw", "-w", "-s", "4096", "-S", "16384", "-d", "32", "-c", "50000", "-n", uri], "qemu-img", 50000L * 4096),
        ("4k strided reads, qemu-img bench, depth 32, 50000 ops", (uri, _) =>
            ["bench", "-f", "raw", "-s", "4096", "-S", "16384", "-d", "32", "-c", "50000", "-n", uri], "qemu-img", 50000L * 4096),
        ("1M sequential reads, qemu-img bench, depth 8, 1 GiB", (uri, _) =>
            ["bench", "-f", "raw", "-s", "1M", "-d", "8", "-c", "1024", "-n", uri], "qemu-img", ImageSize),
        ("1M sequential writes, qemu-img bench, depth 8, 1 GiB", (uri, _) =>
            ["bench", "-f", "raw", "-w", "-s", "1M", "-d", "8", "-c", "1024", "-n", uri], "qemu-img", ImageSize),
        ("nbdcopy export -> null:, 1 connection", (uri, _) => ["--connections=1", uri, "null:"], "nbdcopy", ImageSize),
        ("nbdcopy export -> null:, 4 connections", (uri, _) => ["--connections=4", uri, "null:"], "nbdcopy", ImageSize),
        ("nbdcopy file -> export, 1 connection", (uri, src) => ["--connections=1", src, uri], "nbdcopy", ImageSize),
    ];

    [Fact]
    public async Task Compare_with_qemu_storage_daemon()
    {
        if (Environment.GetEnvironmentVariable("NBD_PERF") != "1")
        {
            output.WriteLine("skipped: set NBD_PERF=1 to run the comparison");
            return;
        }
        await using var f = NbdFixture.Create();
        var src = Path.Combine(f.Dir, "src.img");
        await FillRandomAsync(src);
        await f.AddRawNodeAsync("d0", ImageSize, fill: fs =>
        {
            using var s = File.OpenRead(src);
            s.CopyTo(fs);
        });
        f.Export("e0", "d0", writable: true);

        var qsdImage = Path.Combine(f.Dir, "qsd.img");
        File.Copy(src, qsdImage);
        var qsdSocket = Path.Combine(f.Dir, "qsd.sock");
        using var qsd = Process.Start(new ProcessStartInfo(Tools.Require("qemu-storage-daemon"))
        {
            ArgumentList =
            {
                "--blockdev", $"driver=file,node-name=f0,filename={qsdImage}",
                "--blockdev", "driver=raw,node-name=d0,file=f0",
                "--nbd-server", $"addr.type=unix,addr.path={qsdSocket}",
                "--export", "type=nbd,id=e0,node-name=d0,writable=on",
            },
            UseShellExecute = false,
        })!;
        try
        {
            for (var i = 0; i < 100 && !File.Exists(qsdSocket); i++)
            {
                await Task.Delay(50);
            }
            var report = new StringBuilder();
            report.AppendLine("| workload | backupd MiB/s | qemu-storage-daemon MiB/s | ratio |");
            report.AppendLine("|---|---:|---:|---:|");
            foreach (var (name, args, tool, bytes) in Workloads)
            {
                var ours = await BestOfAsync(tool, args(f.Uri("d0"), src), bytes);
                var theirs = await BestOfAsync(tool, args($"nbd+unix:///d0?socket={qsdSocket}", src), bytes);
                report.AppendLine(CultureInfo.InvariantCulture,
                    $"| {name} | {ours:F0} | {theirs:F0} | {ours / theirs:F2} |");
            }
            output.WriteLine(report.ToString());
        }
        finally
        {
            qsd.Kill();
            await qsd.WaitForExitAsync();
        }
    }

    /// <summary>Best of three runs, in MiB/s; qemu-img bench's own timing when it gives one.</summary>
    private async Task<double> BestOfAsync(string tool, string[] args, long bytes)
    {
        var best = 0.0;
        for (var i = 0; i < 3; i++)
        {
            var sw = Stopwatch.StartNew();
            var r = await Tools.MustRunAsync(tool, args);
            var seconds = sw.Elapsed.TotalSeconds;
            if (RunCompleted().Match(r.Stdout) is { Success: true } m)
            {
                seconds = double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture);
            }
            best = Math.Max(best, bytes / (1024.0 * 1024.0) / seconds);
        }
        output.WriteLine($"{tool} {string.Join(' ', args)}: {best:F0} MiB/s");
        return best;
    }

    private static async Task FillRandomAsync(string path)
    {
        var buf = new byte[1 << 20];
        var rnd = new Random(42);
        await using var fs = new FileStream(path, FileMode.Create);
        for (long i = 0; i < ImageSize; i += buf.Length)
        {
            rnd.NextBytes(buf);
            await fs.WriteAsync(buf);
        }
    }

    [GeneratedRegex(@"Run completed in ([0-9.]+) seconds")]
    private static partial Regex RunCompleted();
}
