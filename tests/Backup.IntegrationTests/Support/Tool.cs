using System.Diagnostics;

namespace Backup.IntegrationTests.Support;

/// <summary>Runs a real peer (qemu-img, qemu-io, nbdinfo, ...) and fails the test if it fails.</summary>
public static class Tool
{
    public static async Task<string> RunAsync(string file, params string[] args)
    {
        var (code, stdout, stderr) = await RunRawAsync(file, args);
        code.Should().Be(0, $"{file} {string.Join(' ', args)} failed: {stdout}{stderr}");
        return stdout;
    }

    /// <summary>Runs a tool whose exit code the test judges itself (qemu-img check: 3 = leaks only).</summary>
    public static Task<(int ExitCode, string Stdout, string Stderr)> RunWithExitCodeAsync(string file, params string[] args) =>
        RunRawAsync(file, args);

    private static async Task<(int ExitCode, string Stdout, string Stderr)> RunRawAsync(string file, string[] args)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync();
        return (p.ExitCode, await stdout, await stderr);
    }
}
