using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests.Operations;

/// <summary>
/// SIGINT stops the daemon however it was launched, as it stops QSD: in the foreground (DaemonLifecycleTests),
/// in the background of a shell without job control (which starts it with SIGINT ignored), and daemonized.
/// </summary>
public class LaunchModeSignalTests
{
    private const int SigInt = 2;

    [Fact]
    public async Task Sigint_stops_a_daemon_started_with_ampersand_from_a_script()
    {
        var dir = DaemonProcess.NewDirectory();
        var socket = Path.Combine(dir, "qmp.sock");
        // The premise: such a shell starts its background jobs with SIGINT ignored.
        var sleeper = int.Parse((await Tool.RunAsync("sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!")).Trim(), System.Globalization.CultureInfo.InvariantCulture);
        try
        {
            (IgnoredSignals(sleeper) & (1UL << (SigInt - 1))).Should().NotBe(0UL, "sh starts background jobs with SIGINT ignored");
        }
        finally
        {
            _ = Kill(sleeper, 9);
        }

        var pid = int.Parse((await Tool.RunAsync("sh", "-c",
            $"cd {dir} && dotnet {DaemonProcess.DaemonDll} --qmp unix:{socket} >/dev/null 2>&1 & echo $!")).Trim(), System.Globalization.CultureInfo.InvariantCulture);
        try
        {
            await using (var qmp = await ConnectWhenReadyAsync(socket))
            {
                (await qmp.ExecuteAsync("query-version")).Should().ContainKey("return");
            }
            _ = Kill(pid, SigInt);
            (await GoneAsync(pid, TimeSpan.FromSeconds(30))).Should().BeTrue("kill -INT stops it, as it stops QSD");
            File.Exists(socket).Should().BeFalse("it stopped cleanly, removing its socket");
        }
        finally
        {
            _ = Kill(pid, 9);
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task Sigint_stops_a_daemonized_daemon()
    {
        var dir = DaemonProcess.NewDirectory();
        var socket = Path.Combine(dir, "qmp.sock");
        var pidFile = Path.Combine(dir, "d.pid");
        var (code, _, stderr) = await DaemonProcess.RunAsync(["--daemonize", "--pidfile", pidFile, "--qmp", "unix:" + socket], dir);
        code.Should().Be(0, stderr);
        var pid = int.Parse((await File.ReadAllTextAsync(pidFile)).Trim(), System.Globalization.CultureInfo.InvariantCulture);
        try
        {
            _ = Kill(pid, SigInt);
            (await GoneAsync(pid, TimeSpan.FromSeconds(30))).Should().BeTrue();
            File.Exists(socket).Should().BeFalse();
            File.Exists(pidFile).Should().BeFalse();
        }
        finally
        {
            _ = Kill(pid, 9);
            Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task<QmpClient> ConnectWhenReadyAsync(string socket)
    {
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while (true)
        {
            try
            {
                return await QmpClient.ConnectAsync(socket);
            }
            catch (System.Net.Sockets.SocketException) when (DateTime.UtcNow < deadline)
            {
                await Task.Delay(50);
            }
        }
    }

    /// <summary>SigIgn of /proc/PID/status.</summary>
    private static ulong IgnoredSignals(int pid)
    {
        var line = File.ReadAllLines($"/proc/{pid}/status").First(l => l.StartsWith("SigIgn:", StringComparison.Ordinal));
        return Convert.ToUInt64(line["SigIgn:".Length..].Trim(), 16);
    }

    /// <summary>True once the process has ended (gone, or a zombie nobody reaped yet: it is not our child).</summary>
    private static async Task<bool> GoneAsync(int pid, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            try
            {
                var state = File.ReadAllLines($"/proc/{pid}/status").FirstOrDefault(l => l.StartsWith("State:", StringComparison.Ordinal));
                if (state is null || state.Contains('Z', StringComparison.Ordinal))
                {
                    return true;
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                return true;
            }
            await Task.Delay(50);
        }
        return false;
    }

#pragma warning disable SYSLIB1054, CA5392
    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill")]
    private static extern int Kill(int pid, int signal);
#pragma warning restore SYSLIB1054, CA5392
}
