using System.Diagnostics;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// tests/iotests, the QEMU-style suite, against the backupd built beside these tests: one case per test
/// script, run by the suite's own runner (`check`), which compares the script's transcript with the golden
/// .out file recorded from qemu-storage-daemon and prints the difference when they differ.
/// </summary>
public class IotestSuiteTests
{
    private static string SuiteDirectory => Path.Combine(DocExample.RepoRoot(), "tests", "iotests");

    public static TheoryData<string> Scripts()
    {
        var data = new TheoryData<string>();
        foreach (var f in Directory.GetFiles(Path.Combine(SuiteDirectory, "tests")).Order(StringComparer.Ordinal))
        {
            if (Path.GetExtension(f).Length == 0)
            {
                data.Add(Path.GetFileName(f));
            }
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Scripts))]
    public async Task Iotest(string script)
    {
        var psi = new ProcessStartInfo("python3")
        {
            WorkingDirectory = SuiteDirectory,
            UseShellExecute = false,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        psi.ArgumentList.Add(Path.Combine(SuiteDirectory, "check"));
        psi.ArgumentList.Add("--timeout");
        psi.ArgumentList.Add("150");
        psi.ArgumentList.Add(script);
        // The daemon under test is the one built with these tests, whatever IOTEST_DAEMON the caller has.
        psi.Environment["IOTEST_DAEMON"] = string.Join(' ', DaemonProcess.DaemonCommand.Select(a => $"'{a}'"));
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromMinutes(3));
        await p.WaitForExitAsync(cts.Token);
        var output = await stdout + await stderr;
        p.ExitCode.Should().Be(0, $"iotest {script} must reproduce its golden transcript:\n{output}");
        output.Should().Contain("1 passed, 0 failed");
    }
}
