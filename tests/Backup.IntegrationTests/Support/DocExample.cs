using System.Diagnostics;

namespace Backup.IntegrationTests.Support;

/// <summary>Runs the python examples of the docs (README, backup guide) against a fresh demo daemon.</summary>
public static class DocExample
{
    public static string RepoRoot()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            if (File.Exists(Path.Combine(d.FullName, "Backup.sln")))
            {
                return d.FullName;
            }
        }
        throw new InvalidOperationException("Backup.sln not found");
    }

    /// <summary>
    /// Starts the demo daemon (state folder <c>state/</c> in a new directory), runs <paramref name="code"/>
    /// with python3 in that directory, and fails the test unless it exits 0. Returns its standard output.
    /// </summary>
    public static async Task<string> RunAsync(string code)
    {
        var dir = DaemonProcess.NewDirectory();
        var script = Path.Combine(dir, "example.py");
        await File.WriteAllTextAsync(script, code);
        await using var d = await DaemonProcess.StartAsync([], dir, addMonitor: false,
            env: new Dictionary<string, string> { ["BACKUPD_STATE_DIR"] = Path.Combine(dir, "state") });
        var socket = Path.Combine(dir, "state", "qmp.sock");
        for (var i = 0; i < 1500 && !File.Exists(socket); i++)
        {
            await Task.Delay(20);
        }
        // The socket file appears at bind(), a moment before listen().
        await Task.Delay(100);

        var psi = new ProcessStartInfo("python3") { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(script);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        await p.WaitForExitAsync(cts.Token);
        p.ExitCode.Should().Be(0, $"{await stderr}\n{d.Stderr}");
        return await stdout;
    }
}
