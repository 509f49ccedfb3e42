using System.Diagnostics;
using System.Text.RegularExpressions;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Sockets passed by the parent process, as harnesses pass them (Scripts/fd_parent.py is the parent,
/// in Python like the suites that do this). Every expectation is what qemu-storage-daemon 7.2 printed
/// for the same script, with its name replaced by ours.
/// </summary>
public partial class FdPassingTests
{
    private const string Session = "greeting ['capabilities', 'version']|qmp_capabilities return|query-version return|quit return|exit 0";

    [Theory]
    [InlineData("listening", Session + "|socket file left False")]
    [InlineData("bound-not-listening", Session)]
    [InlineData("socketpair", Session)]
    [InlineData("client-mode", Session)]
    [InlineData("socketpair-server", "exit 1|stderr backupd: --chardev socket,id=m,fd=4,server=on,wait=off: Failed to listen on fd socket: Invalid argument")]
    [InlineData("not-a-socket", "exit 1|stderr backupd: --chardev socket,id=m,fd=3,server=on,wait=off: File descriptor '3' is not a socket")]
    [InlineData("closed-fd", "exit 1|stderr backupd: --chardev socket,id=m,fd=77,server=on,wait=off: File descriptor '77' is not a socket")]
    [InlineData("fd-and-path", "exit 1|stderr backupd: --chardev socket,id=m,fd=3,path=$WORK/y.sock,server=on,wait=off: None or one of 'path', 'fd' or 'host' option required.")]
    [InlineData("nbd-fd", "qemu-io write 0|pattern on disk True|nbd-server-stop {'return': {}}|socket file left False|exit 0")]
    public async Task A_socket_passed_as_a_file_descriptor_serves_as_QSD_serves_it(string scenario, string expected)
    {
        var psi = new ProcessStartInfo("python3") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in new[] { Path.Combine(AppContext.BaseDirectory, "Scripts", "fd_parent.py"), scenario }.Concat(DaemonProcess.DaemonCommand))
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        await p.WaitForExitAsync(cts.Token);
        p.ExitCode.Should().Be(0, await stderr);
        var lines = WorkDir().Replace(await stdout, "$WORK").Split('\n', StringSplitOptions.RemoveEmptyEntries);
        lines.Should().Equal(expected.Split('|'));
    }

    [GeneratedRegex("/tmp/cli-fd-[A-Za-z0-9_]+")]
    private static partial Regex WorkDir();
}
