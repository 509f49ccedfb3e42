using System.Diagnostics;

namespace Backup.Nbd.Tests.Support;

/// <summary>Runs the real NBD peers (qemu-io, qemu-img, nbdinfo, nbdcopy). A missing tool fails the test with a reason.</summary>
internal static class Tools
{
    public sealed record Result(int ExitCode, string Stdout, string Stderr)
    {
        public string All => Stdout + Stderr;
    }

    public static string Require(string tool)
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':'))
        {
            var p = Path.Combine(dir, tool);
            if (File.Exists(p))
            {
                return p;
            }
        }
        throw new InvalidOperationException($"{tool} is not installed (apt-get install -y qemu-utils libnbd-bin nbdkit): interop tests need it");
    }

    public static async Task<Result> RunAsync(string tool, params string[] args)
    {
        var psi = new ProcessStartInfo(Require(tool))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        try
        {
            await p.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{tool} {string.Join(' ', args)} did not finish: {await stderr}");
        }
        return new Result(p.ExitCode, await stdout, await stderr);
    }

    public static async Task<Result> MustRunAsync(string tool, params string[] args)
    {
        var r = await RunAsync(tool, args);
        r.ExitCode.Should().Be(0, $"{tool} {string.Join(' ', args)} failed: {r.All}");
        return r;
    }
}
