using System.Diagnostics;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>README's worked example is run as written, against the demo daemon: the docs cannot rot.</summary>
public class ReadmeExampleTests
{
    private static string RepoRoot()
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

    [Fact]
    public async Task The_full_and_incremental_example_works_as_written()
    {
        var readme = await File.ReadAllLinesAsync(Path.Combine(RepoRoot(), "README.md"));
        var section = readme.SkipWhile(l => !l.StartsWith("## Full and incremental", StringComparison.Ordinal)).ToList();
        var code = section.SkipWhile(l => l != "```python").Skip(1).TakeWhile(l => l != "```").ToList();
        code.Should().NotBeEmpty("README has the worked example");

        var dir = DaemonProcess.NewDirectory();
        var script = Path.Combine(dir, "example.py");
        await File.WriteAllLinesAsync(script, code);
        await using var d = await DaemonProcess.StartAsync([], dir, addMonitor: false,
            env: new Dictionary<string, string> { ["BACKUPD_STATE_DIR"] = Path.Combine(dir, "state") });
        var socket = Path.Combine(dir, "state", "qmp.sock");
        for (var i = 0; i < 1500 && !File.Exists(socket); i++)
        {
            await Task.Delay(20);
        }

        var psi = new ProcessStartInfo("python3") { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add(script);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        await p.WaitForExitAsync(cts.Token);
        p.ExitCode.Should().Be(0, await stderr);
        (await stdout).Should().Contain("Images are identical.");
    }
}
