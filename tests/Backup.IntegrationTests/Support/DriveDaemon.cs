namespace Backup.IntegrationTests.Support;

/// <summary>
/// A daemon serving one qcow2 image as node drive0, writable over NBD as export drive0: what the tests of
/// bitmaps that outlive a daemon start again and again on the same image. Each start gets a new directory.
/// </summary>
public static class DriveDaemon
{
    /// <summary>backupd, or another executable taking the same command line (qemu-storage-daemon).</summary>
    public static async Task<(DaemonProcess Daemon, QmpClient Qmp)> StartAsync(string image, string? executable = null)
    {
        var dir = DaemonProcess.NewDirectory();
        var daemon = await DaemonProcess.StartAsync(
        [
            "--blockdev", $"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=qcow2,node-name=drive0,file=file0",
            "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(dir, "nbd.sock")}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on",
        ], dir, executable: executable);
        return (daemon, await daemon.ConnectAsync());
    }

    public static string NbdSocket(DaemonProcess daemon) => Path.Combine(daemon.Directory, "nbd.sock");

    public static string NbdUri(DaemonProcess daemon) => $"nbd+unix:///drive0?socket={NbdSocket(daemon)}";
}
