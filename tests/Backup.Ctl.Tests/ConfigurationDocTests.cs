using System.Diagnostics;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.Ctl.Tests;

/// <summary>
/// docs/configuration.md's example, run as written with its folders moved under a temporary one: backupd
/// starts from the file, serves what it describes, and the doc's commands (backupctl, nbdinfo) work.
/// </summary>
public class ConfigurationDocTests
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

    private static string Block(string[] doc, string fence) =>
        string.Join('\n', doc.SkipWhile(l => l != "## Example").SkipWhile(l => l != fence).Skip(1).TakeWhile(l => l != "```"));

    [Fact]
    public async Task The_example_starts_the_daemon_it_describes()
    {
        var doc = File.ReadAllLines(Path.Combine(RepoRoot(), "docs", "configuration.md"));
        var dir = DaemonProcess.NewDirectory();
        string Relocate(string text) => text.Replace("/var/lib/backupd", Path.Combine(dir, "lib"), StringComparison.Ordinal)
            .Replace("/run/backupd", Path.Combine(dir, "run"), StringComparison.Ordinal)
            .Replace("/var/log/backupd", Path.Combine(dir, "log"), StringComparison.Ordinal);
        var config = Relocate(Block(doc, "```json"));
        JsonNode.Parse(config).Should().BeOfType<JsonObject>();
        foreach (var sub in new[] { "lib", "run", "log" })
        {
            Directory.CreateDirectory(Path.Combine(dir, sub));
        }
        var configFile = Path.Combine(dir, "config.json");
        await File.WriteAllTextAsync(configFile, config);
        await using (var f = File.Create(Path.Combine(dir, "lib", "disk0.img")))
        {
            f.SetLength(64 << 20);
        }

        // The file names the daemon's QMP socket: no monitor of the test's own.
        await using var d = await DaemonProcess.StartAsync(["--config", configFile], dir, addMonitor: false);
        var socket = Path.Combine(dir, "run", "qmp.sock");
        for (var i = 0; i < 3000 && !File.Exists(socket) && !d.HasExited; i++)
        {
            await Task.Delay(20);
        }
        await Task.Delay(100); // the socket file appears at bind(), a moment before listen()
        await using var qmp = await QmpClient.ConnectAsync(socket);
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray();
        nodes.Select(n => n!["node-name"]!.GetValue<string>()).Should().Contain(["drive0", "disk0"]);
        (await qmp.ExecuteAsync("query-block-exports"))["return"]!.AsArray().Should().ContainSingle()
            .Which!["id"]!.GetValue<string>().Should().Be("exp0");
        File.Exists(Path.Combine(dir, "run", "backupd.pid")).Should().BeTrue();

        var commands = Relocate(Block(doc, "```sh"));
        commands.Should().Contain("backupctl ").And.Contain("nbdinfo ");
        var script = $"set -e\nbackupctl() {{ dotnet '{Path.Combine(AppContext.BaseDirectory, "backupctl.dll")}' \"$@\"; }}\n{commands}\n";
        var psi = new ProcessStartInfo("bash") { WorkingDirectory = dir, RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add(script);
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(2));
        await p.WaitForExitAsync(cts.Token);
        var output = await stdout;
        p.ExitCode.Should().Be(0, $"{output}\n{await stderr}\n{d.Stderr}");
        output.Should().Contain("export-size: 67108864");

        (await qmp.ExecuteAsync("quit")).Should().ContainKey("return");
        (await d.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);
        var log = await File.ReadAllTextAsync(Path.Combine(dir, "log", "backupd.log"));
        log.Should().Contain("[INF] Backup.Qmp: QMP listening on unix:" + socket);
        Directory.Delete(dir, recursive: true);
    }
}
