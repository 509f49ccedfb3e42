using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests.Operations;

/// <summary>
/// packaging/systemd/backupd.service is a unit systemd accepts, and the daemon speaks the notify protocol
/// it declares (Type=notify): READY=1 only once QMP answers, STOPPING=1 when SIGTERM arrives.
/// </summary>
public class SystemdTests
{
    private static string UnitFile => Path.Combine(DocExample.RepoRoot(), "packaging", "systemd", "backupd.service");

    /// <summary>The apphost built beside the tests (the project reference copies it), standing in for /opt/backupd/backupd.</summary>
    private static string Apphost => Path.Combine(AppContext.BaseDirectory, "backupd");

    [Fact]
    public async Task The_unit_file_passes_systemd_analyze_verify()
    {
        File.Exists(Apphost).Should().BeTrue("ExecStart must name an existing binary for verify to pass");
        var unit = await File.ReadAllTextAsync(UnitFile);
        unit.Should().Contain("\nType=notify\n").And.Contain("\nRestart=on-failure\n").And.Contain("\nDynamicUser=yes\n")
            .And.Contain("\nProtectSystem=strict\n").And.Contain("\nPrivateTmp=yes\n").And.Contain("\nNoNewPrivileges=yes\n")
            .And.Contain("\nStateDirectory=backupd\n").And.Contain("\nRuntimeDirectory=backupd\n");
        unit.Should().Contain("ExecStart=/opt/backupd/backupd ");

        var dir = DaemonProcess.NewDirectory();
        try
        {
            var copy = Path.Combine(dir, "backupd.service");
            await File.WriteAllTextAsync(copy, unit.Replace("ExecStart=/opt/backupd/backupd ", $"ExecStart={Apphost} ", StringComparison.Ordinal));
            var (code, stdout, stderr) = await Tool.RunWithExitCodeAsync("systemd-analyze", "verify", "--man=no", copy);
            code.Should().Be(0, stdout + stderr);
            // Warnings (an unknown key, a bad value) do not change the exit code: there must be none about our unit.
            (stdout + stderr).Should().NotContain("backupd.service", stdout + stderr);

            // The check can fail: a unit whose binary does not exist is refused.
            await File.WriteAllTextAsync(copy, unit);
            var broken = await Tool.RunWithExitCodeAsync("systemd-analyze", "verify", "--man=no", copy);
            broken.ExitCode.Should().NotBe(0);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task Ready_comes_once_qmp_answers_and_stopping_at_sigterm()
    {
        var dir = DaemonProcess.NewDirectory();
        var notifyPath = Path.Combine(dir, "notify.sock");
        using var notify = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        notify.Bind(new UnixDomainSocketEndPoint(notifyPath));
        var qmpSocket = Path.Combine(dir, "qmp.sock");

        var psi = new ProcessStartInfo("dotnet") { RedirectStandardError = true, RedirectStandardOutput = true, WorkingDirectory = dir };
        foreach (var a in new[] { DaemonProcess.DaemonDll, "--qmp", "unix:" + qmpSocket, "--log-level", "info" })
        {
            psi.ArgumentList.Add(a);
        }
        psi.Environment["NOTIFY_SOCKET"] = notifyPath;
        using var daemon = Process.Start(psi)!;
        var stderr = daemon.StandardError.ReadToEndAsync();
        try
        {
            var ready = await ReceiveAsync(notify, TimeSpan.FromSeconds(60));
            ready.Should().Contain("READY=1");
            // At READY=1 the QMP socket answers at the first try: no waiting for it to appear.
            await using (var qmp = await QmpClient.ConnectAsync(qmpSocket))
            {
                (await qmp.ExecuteAsync("query-version")).Should().ContainKey("return");
            }

            _ = Kill(daemon.Id, 15);
            var stopping = await ReceiveAsync(notify, TimeSpan.FromSeconds(30));
            stopping.Should().Contain("STOPPING=1");
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            await daemon.WaitForExitAsync(cts.Token);
            daemon.ExitCode.Should().Be(0, await stderr);
            File.Exists(qmpSocket).Should().BeFalse();
        }
        finally
        {
            if (!daemon.HasExited)
            {
                daemon.Kill();
            }
            Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task<string> ReceiveAsync(Socket socket, TimeSpan timeout)
    {
        var buffer = new byte[4096];
        using var cts = new CancellationTokenSource(timeout);
        var n = await socket.ReceiveAsync(buffer, SocketFlags.None, cts.Token);
        return Encoding.UTF8.GetString(buffer, 0, n);
    }

#pragma warning disable SYSLIB1054, CA5392
    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill")]
    private static extern int Kill(int pid, int signal);
#pragma warning restore SYSLIB1054, CA5392
}
