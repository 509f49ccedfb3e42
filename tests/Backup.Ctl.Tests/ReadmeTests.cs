using System.Diagnostics;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.Ctl.Tests;

/// <summary>README's backupctl section, run as written (bash, the built backupctl) against a fresh demo daemon.</summary>
public class ReadmeTests
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

    /// <summary>The sh blocks of the README section that starts with <paramref name="heading"/>.</summary>
    private static List<string> ShellBlocks(string heading)
    {
        var lines = File.ReadAllLines(Path.Combine(RepoRoot(), "README.md"));
        var section = lines.SkipWhile(l => !l.StartsWith(heading, StringComparison.Ordinal)).Skip(1)
            .TakeWhile(l => !l.StartsWith("## ", StringComparison.Ordinal)).ToList();
        var blocks = new List<string>();
        for (var i = 0; i < section.Count; i++)
        {
            if (section[i] == "```sh")
            {
                blocks.Add(string.Join('\n', section.Skip(i + 1).TakeWhile(l => l != "```")));
            }
        }
        return blocks;
    }

    [Fact]
    public async Task The_backupctl_section_works_as_written()
    {
        var blocks = ShellBlocks("## backupctl");
        blocks.Should().HaveCount(2, "the section has the build step and the session");
        blocks[0].Should().Contain("alias backupctl=");

        var dir = DaemonProcess.NewDirectory();
        // The demo daemon, started in the folder as README says (state/ under it).
        await using var daemon = await DaemonProcess.StartAsync([], dir, addMonitor: false);
        var socket = Path.Combine(dir, "state", "qmp.sock");
        for (var i = 0; i < 1500 && !File.Exists(socket); i++)
        {
            await Task.Delay(20);
        }
        await (await QmpClient.ConnectAsync(socket)).DisposeAsync();

        // The build step is this test's own build; the alias becomes a function (aliases are off in scripts).
        var script = $"set -e -o pipefail\nbackupctl() {{ dotnet '{Path.Combine(AppContext.BaseDirectory, "backupctl.dll")}' \"$@\"; }}\n{blocks[1]}\n";
        var psi = new ProcessStartInfo("bash") { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add(script);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(5));
        await p.WaitForExitAsync(cts.Token);
        var output = await stdout;
        p.ExitCode.Should().Be(0, $"{output}\n{await stderr}\n{daemon.Stderr}");

        output.Should().Contain("backup(s) verified");
        output.Should().Contain("drive0-0004-diff.qcow2");
        var last = JsonNode.Parse(output.TrimEnd('\n').Split('\n')[^1])!;
        last["ok"]!.GetValue<bool>().Should().BeTrue();
        last["kind"]!.GetValue<string>().Should().Be("inc");
        last["sequence"]!.GetValue<int>().Should().Be(5);

        last["drives"]!.AsArray().Select(d => d!["drive"]!.GetValue<string>()).Should().Equal("drive0", "drive1");
        output.Should().Contain("drive1-0004-diff.qcow2");

        // The restores as of backup 2 hold the first writes and not the second.
        await Tool.RunAsync("qemu-io", "-f", "raw", Path.Combine(dir, "restored0.raw"), "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0 100M 64k");
        await Tool.RunAsync("qemu-io", "-f", "raw", Path.Combine(dir, "restored1.raw"), "-c", "read -P 0x6a 5M 64k", "-c", "read -P 0 1M 64k");
    }
}
