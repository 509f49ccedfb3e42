using System.Diagnostics;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests.Operations;

/// <summary>README's install commands, run as written.</summary>
public class InstallTests
{
    private static List<string> ReadmeBlock(string heading, string fence, int index = 0)
    {
        var lines = File.ReadAllLines(Path.Combine(DocExample.RepoRoot(), "README.md"));
        var section = lines.SkipWhile(l => l != heading).Skip(1).TakeWhile(l => !l.StartsWith("## ", StringComparison.Ordinal)).ToList();
        var blocks = new List<List<string>>();
        for (var i = 0; i < section.Count; i++)
        {
            if (section[i] == fence)
            {
                var block = section.Skip(i + 1).TakeWhile(l => l != "```").ToList();
                blocks.Add(block);
                i += block.Count + 1;
            }
        }
        return blocks[index];
    }

    /// <summary>
    /// `dotnet publish` to a self-contained folder, then the published binary. It runs in a copy of the sources
    /// so that its Release restore for linux-x64 leaves the checkout's build alone. A whole Release build: about
    /// 2½ minutes on an idle 2-core machine, over 15 alongside the rest of the suite, so .ci/run runs it on its
    /// own after the suite (<see cref="PublishFactAttribute"/>).
    /// </summary>
    [PublishFact]
    public async Task The_publish_commands_of_the_readme_work_as_written()
    {
        var commands = ReadmeBlock("## Install and run as a service", "```sh");
        commands.Should().Contain(c => c.StartsWith("dotnet publish src/Backup.Daemon ", StringComparison.Ordinal) && c.Contains("--self-contained", StringComparison.Ordinal));
        var root = DocExample.RepoRoot();
        var copy = DaemonProcess.NewDirectory();
        try
        {
            CopyTree(Path.Combine(root, "src"), Path.Combine(copy, "src"));
            foreach (var f in Directory.GetFiles(root).Where(f => Path.GetFileName(f).StartsWith("Directory.", StringComparison.Ordinal) || Path.GetFileName(f) == ".editorconfig"))
            {
                File.Copy(f, Path.Combine(copy, Path.GetFileName(f)));
            }
            var output = "";
            foreach (var command in commands)
            {
                var psi = new ProcessStartInfo("sh") { WorkingDirectory = copy, RedirectStandardOutput = true, RedirectStandardError = true };
                psi.ArgumentList.Add("-c");
                psi.ArgumentList.Add(command);
                using var p = Process.Start(psi)!;
                var stdout = p.StandardOutput.ReadToEndAsync();
                var stderr = p.StandardError.ReadToEndAsync();
                using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(20));
                await p.WaitForExitAsync(cts.Token);
                p.ExitCode.Should().Be(0, $"{command}\n{await stdout}\n{await stderr}");
                output = await stdout;
            }
            output.Should().StartWith("backupd version ");
            File.Exists(Path.Combine(copy, "out", "backupd", "backupd")).Should().BeTrue();
            // Self-contained: the runtime is in the folder, not taken from the machine.
            File.Exists(Path.Combine(copy, "out", "backupd", "libcoreclr.so")).Should().BeTrue();
        }
        finally
        {
            Directory.Delete(copy, recursive: true);
        }
    }

    private static void CopyTree(string from, string to)
    {
        Directory.CreateDirectory(to);
        foreach (var f in Directory.GetFiles(from))
        {
            File.Copy(f, Path.Combine(to, Path.GetFileName(f)));
        }
        foreach (var d in Directory.GetDirectories(from).Where(d => Path.GetFileName(d) is not ("bin" or "obj")))
        {
            CopyTree(d, Path.Combine(to, Path.GetFileName(d)));
        }
    }
}

/// <summary>
/// A test that runs only when BACKUPD_PUBLISH_TEST=1 (set by .ci/run for its own step after the suite), and
/// is reported as skipped otherwise: a full Release publish must not compete with the parallel suite.
/// </summary>
public sealed class PublishFactAttribute : FactAttribute
{
    public const string Variable = "BACKUPD_PUBLISH_TEST";

    public PublishFactAttribute()
    {
        if (Environment.GetEnvironmentVariable(Variable) != "1")
        {
            Skip = $"a full Release publish: runs alone in .ci/run ({Variable}=1)";
        }
    }
}
