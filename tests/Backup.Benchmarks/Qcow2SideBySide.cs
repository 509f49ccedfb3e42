using System.Diagnostics;
using System.Globalization;
using Backup.Block;

namespace Backup.Benchmarks;

/// <summary>
/// The qcow2 target workloads of <see cref="Qcow2Benchmarks"/> as alternating rounds with medians, for a
/// shared, noisy machine where BenchmarkDotNet's short job gives error bars as large as the means:
/// per round, raw then qcow2, each on a fresh image (sequential) or the same warm 16 GiB image
/// (random). Reports wall time and the process's CPU time (user + system) per workload; CPU time is
/// steadier when other jobs compete for the two cores.
/// <c>dotnet run -c Release --project tests/Backup.Benchmarks -- qcow2-side-by-side ROUNDS DIR [direct]</c>
/// </summary>
internal static class Qcow2SideBySide
{
    private const int Chunk = 1 << 20;
    private const int SeqCount = 256;
    private const int SeqDepth = 8;
    private const long RandomSize = 16L << 30;
    private const int RandomOps = 8192;
    private const int RandomDepth = 32;
    private const int RandomPasses = 4;

    public static async Task RunAsync(int rounds, string dir, bool direct)
    {
        Directory.CreateDirectory(dir);
        var results = new SortedDictionary<string, List<double>>(StringComparer.Ordinal);
        var data = new byte[Chunk];
        new Random(1).NextBytes(data);
        var rng = new Random(42);
        var offsets = Enumerable.Range(0, RandomOps).Select(_ => rng.NextInt64(RandomSize / 4096) * 4096).ToArray();
        var random = new Dictionary<string, (BlockGraph Graph, BlockNode Node)>();
        try
        {
            foreach (var fmt in Formats)
            {
                random[fmt] = await OpenAsync(BenchmarkWorkload.CreateImage(dir, "random", fmt, RandomSize, prealloc: true), fmt, direct);
                var warm = new byte[4096];
                for (long o = 0; o < RandomSize; o += 32L << 20)
                {
                    // One read per 32 MiB loads every L2 table (each maps 512 MiB at 64 KiB clusters).
                    await random[fmt].Node.ReadAsync(o, warm);
                }
            }
            for (var r = 0; r < rounds; r++)
            {
                foreach (var fmt in Formats)
                {
                    var (graph, node) = await OpenAsync(BenchmarkWorkload.CreateImage(dir, "seq", fmt, (long)SeqCount * Chunk, prealloc: false), fmt, direct);
                    await MeasureAsync(results, $"seq write 256 MiB {fmt}", 1,
                        () => BenchmarkWorkload.RunAsync(SeqDepth, SeqCount, 0, (i, _) => node.WriteAsync(i * (long)Chunk, data)));
                    await MeasureAsync(results, $"seq read 256 MiB {fmt}", 1,
                        () => BenchmarkWorkload.RunAsync(SeqDepth, SeqCount, Chunk, (i, b) => node.ReadAsync(i * (long)Chunk, b)));
                    await graph.CloseAllAsync();
                    var rnd = random[fmt].Node;
                    await MeasureAsync(results, $"random 4 KiB read {fmt} (per read)", RandomOps * RandomPasses, async () =>
                    {
                        for (var p = 0; p < RandomPasses; p++)
                        {
                            await BenchmarkWorkload.RunAsync(RandomDepth, RandomOps, 4096, (i, b) => rnd.ReadAsync(offsets[i], b));
                        }
                    });
                }
            }
        }
        finally
        {
            foreach (var (graph, _) in random.Values)
            {
                await graph.CloseAllAsync();
            }
            foreach (var f in Directory.GetFiles(dir))
            {
                File.Delete(f);
            }
        }
        foreach (var (name, list) in results)
        {
            list.Sort();
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"{name,-48} median {list[list.Count / 2],10:F2}   all {string.Join(' ', list.Select(v => v.ToString("F2", CultureInfo.InvariantCulture)))}"));
        }
    }

    private static readonly string[] Formats = ["raw", "qcow2"];

    /// <summary>Wall time in ms (µs per op when <paramref name="ops"/> > 1) and CPU time likewise.</summary>
    private static async Task MeasureAsync(SortedDictionary<string, List<double>> results, string name, int ops, Func<Task> work)
    {
        using var self = Process.GetCurrentProcess();
        var cpu = self.TotalProcessorTime;
        var sw = Stopwatch.StartNew();
        await work();
        var wall = sw.Elapsed.TotalMilliseconds;
        self.Refresh();
        var cpuMs = (self.TotalProcessorTime - cpu).TotalMilliseconds;
        var scale = ops > 1 ? 1000.0 / ops : 1.0;
        var unit = ops > 1 ? "µs" : "ms";
        Add(results, $"{name} wall {unit}", wall * scale);
        Add(results, $"{name} cpu {unit}", cpuMs * scale);
    }

    private static void Add(SortedDictionary<string, List<double>> results, string key, double value)
    {
        if (!results.TryGetValue(key, out var list))
        {
            results[key] = list = [];
        }
        list.Add(value);
    }

    private static async Task<(BlockGraph, BlockNode)> OpenAsync(string path, string format, bool direct)
    {
        var graph = BlockGraph.CreateDefault();
        var node = await graph.AddAsync(new BlockOptions
        {
            ["driver"] = format,
            ["node-name"] = "n",
            ["file"] = new BlockOptions
            {
                ["driver"] = "file",
                ["filename"] = path,
                ["cache"] = new BlockOptions { ["direct"] = direct },
            },
        });
        return (graph, node);
    }
}
