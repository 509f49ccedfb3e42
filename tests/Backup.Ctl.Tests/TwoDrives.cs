using Backup.IntegrationTests.Support;

namespace Backup.Ctl.Tests;

/// <summary>
/// backupd with two drives as a VM would have them, a raw disk (drive0) and a qcow2 disk (drive1), both
/// exported writable over NBD so that qemu-io can write as a guest does.
/// </summary>
public sealed class TwoDrives : IAsyncDisposable
{
    public const long Size = 64 << 20;
    public static readonly string[] Names = ["drive0", "drive1"];

    private TwoDrives(DaemonProcess daemon) => Daemon = daemon;

    public DaemonProcess Daemon { get; }

    public string Dir => Daemon.Directory;

    public string Qmp => "unix:" + Daemon.QmpSocket;

    public string NbdSocket => Path.Combine(Dir, "nbd.sock");

    public string Uri(string drive) => $"nbd+unix:///{drive}?socket={NbdSocket}";

    /// <summary>backupd, or with <paramref name="executable"/> another daemon with QSD's command line (qemu-storage-daemon).</summary>
    public static async Task<TwoDrives> StartAsync(string? executable = null)
    {
        var dir = DaemonProcess.NewDirectory();
        var raw = Path.Combine(dir, "disk0.raw");
        await using (var f = File.Create(raw))
        {
            f.SetLength(Size);
        }
        var qcow2 = Path.Combine(dir, "disk1.qcow2");
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", qcow2, Size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        var daemon = await DaemonProcess.StartAsync(
        [
            "--blockdev", $"driver=file,node-name=file0,filename={raw}",
            "--blockdev", "driver=raw,node-name=drive0,file=file0",
            "--blockdev", $"driver=file,node-name=file1,filename={qcow2}",
            "--blockdev", "driver=qcow2,node-name=drive1,file=file1",
            "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(dir, "nbd.sock")}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on",
            "--export", "type=nbd,id=e1,node-name=drive1,name=drive1,writable=on",
        ], dir, executable: executable);
        // The socket appears at bind(), a moment before listen(): wait until it answers.
        await (await daemon.ConnectAsync()).DisposeAsync();
        return new TwoDrives(daemon);
    }

    /// <summary>A guest write through the drive's NBD export.</summary>
    public Task WriteAsync(string drive, string pattern, string offset, string length) =>
        Tool.RunAsync("qemu-io", "-f", "raw", Uri(drive), "-c", $"write -P {pattern} {offset} {length}");

    /// <summary>The drive's content now, read through NBD into a raw file.</summary>
    public async Task<string> SnapshotAsync(string drive, string name)
    {
        var path = Path.Combine(Dir, name + ".raw");
        await Tool.RunAsync("qemu-img", "convert", "-f", "raw", "-O", "raw", Uri(drive), path);
        return path;
    }

    public ValueTask DisposeAsync() => Daemon.DisposeAsync();
}
