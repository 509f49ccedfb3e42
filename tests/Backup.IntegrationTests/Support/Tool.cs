using System.Diagnostics;

namespace Backup.IntegrationTests.Support;

/// <summary>Runs a real peer (qemu-img, qemu-io, nbdinfo, ...) and fails the test if it fails.</summary>
public static class Tool
{
    public static async Task<string> RunAsync(string file, params string[] args)
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
        p.ExitCode.Should().Be(0, $"{file} {string.Join(' ', args)} failed: {await stdout}{await stderr}");
        return await stdout;
    }
}
