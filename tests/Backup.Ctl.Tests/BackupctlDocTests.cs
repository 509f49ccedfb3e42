using System.Diagnostics;

namespace Backup.Ctl.Tests;

/// <summary>
/// docs/backupctl.md's commands. Its one runnable block builds backupctl and shows its help; the other blocks
/// are synopses (no shell fence), whose commands the README and BackupChainTests run.
/// </summary>
public class BackupctlDocTests
{
    [Fact]
    public async Task The_build_and_help_commands_work_as_written()
    {
        var root = AppContext.BaseDirectory;
        while (!File.Exists(Path.Combine(root, "Backup.sln")))
        {
            root = Path.GetDirectoryName(root)!;
        }
        var doc = File.ReadAllLines(Path.Combine(root, "docs", "backupctl.md"));
        var blocks = new List<List<string>>();
        for (var i = 0; i < doc.Length; i++)
        {
            if (doc[i] == "```sh")
            {
                blocks.Add(doc.Skip(i + 1).TakeWhile(l => l != "```").ToList());
            }
        }
        blocks.Should().ContainSingle("the other blocks are synopses");
        var block = blocks[0];
        block[0].Should().Be("dotnet build src/Backup.Ctl", "the build step is this test's own build");
        const string built = "src/Backup.Ctl/bin/Debug/net10.0/backupctl.dll";
        block[1].Should().Contain(built);
        var command = block[1].Replace(built, Path.Combine(AppContext.BaseDirectory, "backupctl.dll"), StringComparison.Ordinal);

        var psi = new ProcessStartInfo("sh") { WorkingDirectory = root, RedirectStandardOutput = true, RedirectStandardError = true };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add(command);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(2));
        await p.WaitForExitAsync(cts.Token);
        p.ExitCode.Should().Be(0, await stderr);
        (await stdout).Should().Contain("backup").And.Contain("chain").And.Contain("bitmap").And.Contain("qmp").And.Contain("events");
    }
}
