using System.Diagnostics;
using System.Globalization;

namespace Backup.Benchmarks;

/// <summary>What the qcow2 benchmarks (BenchmarkDotNet and side-by-side) share: images and parallel workers.</summary>
internal static class BenchmarkWorkload
{
    /// <summary>Runs operations 0..count-1 from <paramref name="depth"/> workers on the thread pool, each with its own buffer.</summary>
    public static async Task RunAsync(int depth, int count, int bufferSize, Func<int, Memory<byte>, ValueTask> op)
    {
        var next = -1;
        var workers = new Task[depth];
        for (var w = 0; w < depth; w++)
        {
            workers[w] = Task.Run(async () =>
            {
                var buffer = new byte[bufferSize];
                int i;
                while ((i = Interlocked.Increment(ref next)) < count)
                {
                    await op(i, buffer).ConfigureAwait(false);
                }
            });
        }
        await Task.WhenAll(workers).ConfigureAwait(false);
    }

    /// <summary>A fresh image made by qemu-img (preallocated with falloc when asked), replacing any old one.</summary>
    public static string CreateImage(string dir, string name, string format, long size, bool prealloc)
    {
        var path = Path.Combine(dir, $"{name}.{format}");
        File.Delete(path);
        var psi = new ProcessStartInfo("qemu-img") { RedirectStandardError = true };
        foreach (var a in new[] { "create", "-q", "-f", format })
        {
            psi.ArgumentList.Add(a);
        }
        if (prealloc)
        {
            psi.ArgumentList.Add("-o");
            psi.ArgumentList.Add("preallocation=falloc");
        }
        psi.ArgumentList.Add(path);
        psi.ArgumentList.Add(size.ToString(CultureInfo.InvariantCulture));
        using var p = Process.Start(psi)!;
        var err = p.StandardError.ReadToEnd();
        p.WaitForExit();
        return p.ExitCode == 0 ? path : throw new InvalidOperationException($"qemu-img create failed: {err}");
    }
}
