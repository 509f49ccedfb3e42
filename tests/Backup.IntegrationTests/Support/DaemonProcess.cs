using System.Diagnostics;
using System.Text;

namespace Backup.IntegrationTests.Support;

/// <summary>
/// The real backupd process, started with a QSD-style command line in a fresh temporary directory
/// and a QMP socket inside it. Disposing stops it (quit, then SIGTERM, then kill) and removes the directory.
/// </summary>
public sealed class DaemonProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _stderr = new();
    private readonly StringBuilder _stdout = new();

    private DaemonProcess(Process process, string dir, string socket)
    {
        _process = process;
        Directory = dir;
        QmpSocket = socket;
    }

    public string Directory { get; }

    public string QmpSocket { get; }

    public int Pid => _process.Id;

    public bool HasExited => _process.HasExited;

    public int ExitCode => _process.ExitCode;

    public string Stderr
    {
        get
        {
            lock (_stderr)
            {
                return _stderr.ToString();
            }
        }
    }

    public string Stdout
    {
        get
        {
            lock (_stdout)
            {
                return _stdout.ToString();
            }
        }
    }

    /// <summary>Path of backupd.dll, built beside the tests through the project reference.</summary>
    public static string DaemonDll => Path.Combine(AppContext.BaseDirectory, "backupd.dll");

    /// <summary>
    /// Set to a backupd executable (the published native binary, say) to run the suite against it instead
    /// of <c>dotnet backupd.dll</c>.
    /// </summary>
    public const string ExecutableVariable = "BACKUPD_TEST_EXECUTABLE";

    /// <summary>How to run backupd: the program and the arguments before the daemon's own.</summary>
    public static IReadOnlyList<string> DaemonCommand =>
        Environment.GetEnvironmentVariable(ExecutableVariable) is { Length: > 0 } exe ? [exe] : ["dotnet", DaemonDll];

    public static string NewDirectory()
    {
        // Unix socket paths are limited to 107 bytes: keep the directory short.
        var dir = Path.Combine("/tmp", "bkd-" + Guid.NewGuid().ToString("N")[..10]);
        System.IO.Directory.CreateDirectory(dir);
        return dir;
    }

    /// <summary>
    /// Starts backupd (or, with <paramref name="executable"/>, another daemon with the same command line, such
    /// as qemu-storage-daemon for interop tests) with <paramref name="args"/> plus a QMP chardev/monitor pair,
    /// and waits for the socket.
    /// </summary>
    public static async Task<DaemonProcess> StartAsync(IEnumerable<string> args, string? dir = null, bool addMonitor = true,
        IDictionary<string, string>? env = null, string? executable = null)
    {
        dir ??= NewDirectory();
        var socket = Path.Combine(dir, "qmp.sock");
        var all = args.ToList();
        if (addMonitor)
        {
            all.AddRange(["--chardev", $"socket,id=mon0,path={socket},server=on,wait=off", "--monitor", "chardev=mon0"]);
        }
        var p = Start(all, dir, env, executable);
        var d = new DaemonProcess(p, dir, socket);
        p.OutputDataReceived += (_, e) => { lock (d._stdout) { d._stdout.AppendLine(e.Data); } };
        p.ErrorDataReceived += (_, e) => { lock (d._stderr) { d._stderr.AppendLine(e.Data); } };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (!File.Exists(socket) && addMonitor)
        {
            if (p.HasExited)
            {
                throw new InvalidOperationException($"{executable ?? "backupd"} exited with {p.ExitCode}: {d.Stderr}");
            }
            if (DateTime.UtcNow > deadline)
            {
                throw new TimeoutException("backupd did not create its QMP socket: " + d.Stderr);
            }
            await Task.Delay(20);
        }
        return d;
    }

    /// <summary>Runs backupd to completion (for options that exit at once) and returns status and output.</summary>
    public static async Task<(int ExitCode, string Stdout, string Stderr)> RunAsync(IEnumerable<string> args, string? dir = null,
        IDictionary<string, string>? env = null)
    {
        dir ??= NewDirectory();
        using var p = Start(args.ToList(), dir, env);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        await p.WaitForExitAsync(cts.Token);
        return (p.ExitCode, await stdout, await stderr);
    }

    private static Process Start(List<string> args, string dir, IDictionary<string, string>? env, string? executable = null)
    {
        var psi = new ProcessStartInfo(executable ?? DaemonCommand[0])
        {
            WorkingDirectory = dir,
            UseShellExecute = false,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
        };
        if (executable is null)
        {
            foreach (var a in DaemonCommand.Skip(1))
            {
                psi.ArgumentList.Add(a);
            }
        }
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        foreach (var (k, v) in env ?? new Dictionary<string, string>())
        {
            psi.Environment[k] = v;
        }
        return Process.Start(psi)!;
    }

    /// <summary>
    /// Connects to the QMP socket. The socket file appears at bind(), a moment before listen(): a refused
    /// connection right after start-up is retried.
    /// </summary>
    public async Task<QmpClient> ConnectAsync(bool negotiate = true)
    {
        for (var attempt = 0; ; attempt++)
        {
            try
            {
                return await QmpClient.ConnectAsync(QmpSocket, negotiate);
            }
            catch (System.Net.Sockets.SocketException e) when (e.SocketErrorCode == System.Net.Sockets.SocketError.ConnectionRefused && attempt < 100 && !HasExited)
            {
                await Task.Delay(20);
            }
        }
    }

    public async Task<int> WaitForExitAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        await _process.WaitForExitAsync(cts.Token);
        return _process.ExitCode;
    }

    public void Signal(int signal) => _ = Kill(_process.Id, signal);

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill")]
#pragma warning disable SYSLIB1054, CA5392
    private static extern int Kill(int pid, int signal);
#pragma warning restore SYSLIB1054, CA5392

    /// <summary>The end of a test that started a daemon and connected to it; either is null if start-up failed.</summary>
    public static async Task ShutdownAsync(QmpClient? qmp, DaemonProcess? daemon)
    {
        if (qmp is not null)
        {
            await qmp.DisposeAsync();
        }
        if (daemon is not null)
        {
            await daemon.DisposeAsync();
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            Signal(15);
            try
            {
                await WaitForExitAsync(TimeSpan.FromSeconds(20));
            }
            catch (OperationCanceledException)
            {
                _process.Kill(entireProcessTree: true);
            }
        }
        _process.Dispose();
        if (Environment.GetEnvironmentVariable("BACKUPD_KEEP_TEST_DIRS") == "1")
        {
            return;
        }
        try
        {
            System.IO.Directory.Delete(Directory, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
