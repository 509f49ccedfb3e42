using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>The soak kills daemons and fills a tmpfs: it runs alone, not beside other test classes.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class SoakCollection
{
    public const string Name = "soak";
}

/// <summary>
/// A short, seeded run of the fault soak (tests/soak/soak.py) against the backupd built beside these tests:
/// kill -9 during guest writes and backups, cancels, EIO and ENOSPC on targets, each trial checked for
/// sound images, whole bitmaps and a daemon that restarts. The seed is printed; BACKUPD_SOAK_SEED replays
/// it, BACKUPD_SOAK_TRIALS and BACKUPD_SOAK_SECONDS make the run longer (docs/reliability.md: nightly).
/// </summary>
[Collection(SoakCollection.Name)]
public sealed partial class SoakTests
{
    private static string Setting(string name, string fallback) =>
        Environment.GetEnvironmentVariable(name) is { Length: > 0 } value ? value : fallback;

    [Fact]
    public async Task A_short_seeded_soak_finds_no_violation()
    {
        var trials = int.Parse(Setting("BACKUPD_SOAK_TRIALS", "30"), CultureInfo.InvariantCulture);
        var seconds = int.Parse(Setting("BACKUPD_SOAK_SECONDS", "60"), CultureInfo.InvariantCulture);
        var seed = Setting("BACKUPD_SOAK_SEED", Random.Shared.Next(1, int.MaxValue).ToString(CultureInfo.InvariantCulture));

        var psi = new ProcessStartInfo("python3")
        {
            UseShellExecute = false,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        foreach (var a in new[]
        {
            Path.Combine(DocExample.RepoRoot(), "tests", "soak", "soak.py"),
            "--daemon", $"dotnet '{DaemonProcess.DaemonDll}'",
            "--trials", trials.ToString(CultureInfo.InvariantCulture),
            // Trials start until this many seconds have gone; the one running then finishes.
            "--time-limit", seconds.ToString(CultureInfo.InvariantCulture),
            "--seed", seed,
        })
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using (var cts = new CancellationTokenSource(TimeSpan.FromSeconds(seconds + 180)))
        {
            try
            {
                await p.WaitForExitAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
                // SIGTERM: the script unwinds and cleans up its trial (daemon, tmpfs mount).
                _ = Kill(p.Id, 15);
                await p.WaitForExitAsync();
            }
        }
        var output = await stdout + await stderr;

        p.ExitCode.Should().Be(0, $"the soak (seed {seed}) must find no violation:\n{output}");
        var summary = Summary().Match(output);
        summary.Success.Should().BeTrue($"the soak prints its summary:\n{output}");
        summary.Groups["violations"].Value.Should().Be("0", output);
        int.Parse(summary.Groups["trials"].Value, CultureInfo.InvariantCulture).Should().BeGreaterThanOrEqualTo(3,
            $"a short soak still runs a few trials:\n{output}");
    }

    [GeneratedRegex(@"^soak: trials=(?<trials>\d+) violations=(?<violations>\d+) seed=\d+$", RegexOptions.Multiline)]
    private static partial Regex Summary();

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static extern int Kill(int pid, int signal);
}
