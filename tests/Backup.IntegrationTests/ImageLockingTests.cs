using System.Diagnostics;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// Image locking between backupd and QEMU's programs, both directions. Every case runs against
/// qemu-storage-daemon 7.2 too, with the same expectations: what QEMU does to QEMU is what backupd and
/// QEMU must do to each other. (Recorded live first; raw images with no format taking write are not
/// protected by QEMU either: its raw driver and export share everything but resize.)
/// </summary>
public sealed class ImageLockingTests : IDisposable
{
    private const string Qsd = "qemu-storage-daemon";
    private const string Backupd = "backupd";

    /// <summary>The images (and NBD sockets) of one test; each daemon runs in a directory of its own.</summary>
    private readonly string _images = DaemonProcess.NewDirectory();

    public void Dispose() => Directory.Delete(_images, recursive: true);

    /// <summary>Starts a daemon in a directory of its own (removed when it stops; the images live elsewhere).</summary>
    private static Task<DaemonProcess> StartAsync(string daemon, string imageDir, params string[] args) =>
        DaemonProcess.StartAsync(args, executable: daemon == Qsd ? Qsd : null);

    private static async Task<string> CreateAsync(string dir, string name, string format)
    {
        var path = Path.Combine(dir, name);
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", format, path, "64M");
        return path;
    }

    private static async Task ExpectFailsAsync(string lockText, string image, string tool, params string[] args)
    {
        var (code, stdout, stderr) = await Tool.RunWithExitCodeAsync(tool, args);
        code.Should().NotBe(0, $"{tool} {string.Join(' ', args)} must be refused: {stdout}");
        stderr.Should().Contain($"Failed to get {lockText} lock").And.Contain($"Is another process using the image [{image}]?");
    }

    [Theory]
    [InlineData(Backupd)]
    [InlineData(Qsd)]
    public async Task Qemu_tools_cannot_write_what_a_daemon_serves_and_read_only_with_force_share(string daemon)
    {
        var dir = _images;
        var rw = await CreateAsync(dir, "rw.qcow2", "qcow2");
        var ro = await CreateAsync(dir, "ro.qcow2", "qcow2");
        var raw = await CreateAsync(dir, "disk.raw", "raw");
        var d = await StartAsync(daemon, dir,
            "--blockdev", $"driver=file,node-name=rwf,filename={rw}", "--blockdev", "driver=qcow2,node-name=rwd,file=rwf",
            "--blockdev", $"driver=file,node-name=rof,filename={ro},read-only=on", "--blockdev", "driver=qcow2,node-name=rod,file=rof,read-only=on",
            "--blockdev", $"driver=file,node-name=rawf,filename={raw}", "--blockdev", "driver=raw,node-name=rawd,file=rawf",
            "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(dir, "nbd.sock")}",
            "--export", "type=nbd,id=e0,node-name=rwd,writable=on", "--export", "type=nbd,id=e1,node-name=rawd,writable=on");
        await using var _ = d;
        await using var qmp = await d.ConnectAsync();

        // A read-write qcow2: no writer, no reader without -U (the format refuses to share write).
        await ExpectFailsAsync("\"write\"", rw, "qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 64k", rw);
        await ExpectFailsAsync("shared \"write\"", rw, "qemu-io", "-f", "qcow2", "-r", "-c", "read 0 64k", rw);
        await ExpectFailsAsync("shared \"write\"", rw, "qemu-img", "info", "-f", "qcow2", rw);
        await ExpectFailsAsync("shared \"write\"", rw, "qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", rw, rw);
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-r", "-U", "-c", "read 0 64k", rw);
        await Tool.RunAsync("qemu-img", "info", "-U", "-f", "qcow2", rw);
        await Tool.RunAsync("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", rw, rw);
        await Tool.RunAsync("qemu-img", "check", "-U", "-f", "qcow2", rw);

        // A read-only qcow2: readers welcome, writers not.
        await ExpectFailsAsync("\"write\"", ro, "qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 64k", ro);
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-r", "-c", "read 0 64k", ro);
        await Tool.RunAsync("qemu-img", "info", "-f", "qcow2", ro);

        // A raw disk: QEMU's raw driver and export share write, so a second writer is not refused.
        await Tool.RunAsync("qemu-io", "-f", "raw", "-c", "write -P 0x99 0 64k", raw);

        // Once the daemon lets go of the image, the tool may write.
        (await qmp.ExecuteAsync("block-export-del", new { id = "e0" }))["return"].Should().NotBeNull();
        await WaitForExportGoneAsync(qmp, "e0");
        await ExpectFailsAsync("\"write\"", rw, "qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 64k", rw);
        (await qmp.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = "rwd" }))["return"].Should().NotBeNull();
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 64k", rw);
    }

    private static async Task WaitForExportGoneAsync(QmpClient qmp, string id)
    {
        for (var i = 0; i < 100; i++)
        {
            var exports = (await qmp.ExecuteAsync("query-block-exports"))["return"]!.AsArray();
            if (!exports.Any(e => (string?)e!["id"] == id))
            {
                return;
            }
            await Task.Delay(50);
        }
        throw new TimeoutException($"export {id} still listed");
    }

    [Theory]
    [InlineData(Backupd)]
    [InlineData(Qsd)]
    public async Task A_daemon_refuses_at_start_up_and_in_blockdev_add_what_qemu_io_holds(string daemon)
    {
        var dir = _images;
        var image = await CreateAsync(dir, "d.qcow2", "qcow2");
        string[] blockdevs = ["--blockdev", $"driver=file,node-name=f,filename={image}", "--blockdev", "driver=qcow2,node-name=d,file=f"];
        string[] readOnly = ["--blockdev", $"driver=file,node-name=f,filename={image},read-only=on", "--blockdev", "driver=qcow2,node-name=d,file=f,read-only=on"];

        using (await HoldAsync(image, "-f", "qcow2"))
        {
            var failed = await StartExpectingFailureAsync(daemon, dir, blockdevs);
            failed.Should().Contain("--blockdev driver=qcow2,node-name=d,file=f: Failed to get \"write\" lock")
                .And.Contain($"Is another process using the image [{image}]?");
            failed = await StartExpectingFailureAsync(daemon, dir, readOnly);
            failed.Should().Contain("--blockdev driver=qcow2,node-name=d,file=f,read-only=on: Failed to get shared \"write\" lock");

            var d = await StartAsync(daemon, dir);
            await using var _ = d;
            await using var qmp = await d.ConnectAsync();
            (await qmp.ExecuteAsync("blockdev-add", new JsonObject { ["driver"] = "file", ["node-name"] = "f", ["filename"] = image }))["return"]
                .Should().NotBeNull("a file node nobody uses takes no locks");
            Error(await qmp.ExecuteAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = "d", ["file"] = "f" }))
                .Should().Be("Failed to get \"write\" lock");
            Error(await qmp.ExecuteAsync("blockdev-add", new JsonObject
            {
                ["driver"] = "qcow2", ["node-name"] = "d2", ["read-only"] = true,
                ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = image },
            })).Should().Be("Failed to get shared \"write\" lock");
            (await qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray().Should().ContainSingle("only 'f' was added");
        }

        using (await HoldAsync(image, "-f", "qcow2", "-r"))
        {
            (await StartExpectingFailureAsync(daemon, dir, blockdevs)).Should().Contain("Failed to get \"write\" lock");
            var d = await StartAsync(daemon, dir, readOnly);
            await d.DisposeAsync();
        }

        using (await HoldAsync(image, "-f", "qcow2", "-r", "-U"))
        {
            var d = await StartAsync(daemon, dir, blockdevs);
            await using var _ = d;
            await using var qmp = await d.ConnectAsync();
            (await qmp.ExecuteAsync("query-named-block-nodes"))["return"]!.AsArray().Count.Should().Be(2);
        }
    }

    [Theory]
    [InlineData(Backupd)]
    [InlineData(Qsd)]
    public async Task Force_share_needs_read_only_and_then_refuses_no_writer(string daemon)
    {
        var dir = _images;
        var image = await CreateAsync(dir, "d.qcow2", "qcow2");
        var d = await StartAsync(daemon, dir);
        await using var _ = d;
        await using var qmp = await d.ConnectAsync();
        JsonObject File(bool? readOnly = null, bool? forceShare = null, string? name = null)
        {
            var o = new JsonObject { ["driver"] = "file", ["filename"] = image };
            if (name is not null)
            {
                o["node-name"] = name;
            }
            if (readOnly is { } r)
            {
                o["read-only"] = r;
            }
            if (forceShare is { } f)
            {
                o["force-share"] = f;
            }
            return o;
        }

        Error(await qmp.ExecuteAsync("blockdev-add", File(forceShare: true, name: "w")))
            .Should().Be("force-share=on can only be used with read-only images");
        Error(await qmp.ExecuteAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "w", ["force-share"] = true, ["file"] = File(),
        })).Should().Be("force-share=on can only be used with read-only images");

        // Like qemu-img info -U: opens beside a writer, where a plain read-only open is refused.
        using (await HoldAsync(image, "-f", "qcow2"))
        {
            Error(await qmp.ExecuteAsync("blockdev-add", new JsonObject
            {
                ["driver"] = "qcow2", ["node-name"] = "plain", ["read-only"] = true, ["file"] = File(),
            })).Should().Be("Failed to get shared \"write\" lock");
            (await qmp.ExecuteAsync("blockdev-add", new JsonObject
            {
                ["driver"] = "qcow2", ["node-name"] = "shared", ["read-only"] = true, ["force-share"] = true, ["file"] = File(),
            })).Should().ContainKey("return");
        }

        // The inline file inherited force-share: QEMU's tools may write and open the image as usual.
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 64k", image);
        await Tool.RunAsync("qemu-img", "info", image);
        (await qmp.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = "shared" })).Should().ContainKey("return");

        // A force-share file node named by a format node that has no force-share of its own: the edge to
        // the file still shares everything.
        (await qmp.ExecuteAsync("blockdev-add", File(readOnly: true, forceShare: true, name: "ff"))).Should().ContainKey("return");
        (await qmp.ExecuteAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = "q", ["read-only"] = true, ["file"] = "ff",
        })).Should().ContainKey("return");
        await Tool.RunAsync("qemu-io", "-f", "qcow2", "-c", "write -P 0x43 64k 64k", image);
    }

    [Theory]
    [InlineData(Backupd, Backupd)]
    [InlineData(Backupd, Qsd)]
    [InlineData(Qsd, Backupd)]
    [InlineData(Qsd, Qsd)]
    public async Task Two_daemons_cannot_open_one_qcow2_read_write(string first, string second)
    {
        var dir = _images;
        var image = await CreateAsync(dir, "d.qcow2", "qcow2");
        var holder = await StartAsync(first, dir,
            "--blockdev", $"driver=file,node-name=f,filename={image}", "--blockdev", "driver=qcow2,node-name=d,file=f");
        await using var _ = holder;
        (await StartExpectingFailureAsync(second, dir,
            "--blockdev", $"driver=file,node-name=f,filename={image}", "--blockdev", "driver=qcow2,node-name=d,file=f"))
            .Should().Contain("Failed to get \"write\" lock");
        (await StartExpectingFailureAsync(second, dir,
            "--blockdev", $"driver=file,node-name=f,filename={image},read-only=on", "--blockdev", "driver=qcow2,node-name=d,file=f,read-only=on"))
            .Should().Contain("Failed to get shared \"write\" lock");
    }

    [Theory]
    [InlineData(Backupd)]
    [InlineData(Qsd)]
    public async Task Conflicts_inside_one_daemon_are_worded_as_qemus(string daemon)
    {
        var dir = _images;
        var image = await CreateAsync(dir, "d.qcow2", "qcow2");
        var d = await StartAsync(daemon, dir, "--blockdev", $"driver=file,node-name=f,filename={image}",
            "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(dir, "nbd.sock")}");
        await using var _ = d;
        await using var qmp = await d.ConnectAsync();
        (await qmp.ExecuteAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = "d", ["file"] = "f" }))["return"].Should().NotBeNull();
        Error(await qmp.ExecuteAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = "d2", ["file"] = "f" })).Should().Be(
            "Permission conflict on node 'f': permissions 'write, resize' are both required by node 'd' (uses node 'f' as 'file' child) " +
            "and unshared by node 'd2' (uses node 'f' as 'file' child).");
        Error(await qmp.ExecuteAsync("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = "e", ["node-name"] = "f", ["writable"] = true })).Should().Be(
            "Permission conflict on node 'f': permissions 'write' are both required by an unnamed block device (uses node 'f' as 'root' child) " +
            "and unshared by node 'd' (uses node 'f' as 'file' child).");
        Error(await qmp.ExecuteAsync("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = "e", ["node-name"] = "f" })).Should().Be(
            "Permission conflict on node 'f': permissions 'resize' are both required by node 'd' (uses node 'f' as 'file' child) " +
            "and unshared by an unnamed block device (uses node 'f' as 'root' child).");
        // A file node of its own on the same image is another open file: the lock bytes keep it out.
        (await qmp.ExecuteAsync("blockdev-add", new JsonObject { ["driver"] = "file", ["node-name"] = "f2", ["filename"] = image }))["return"].Should().NotBeNull();
        (await qmp.ExecuteAsync("blockdev-add", new JsonObject { ["driver"] = "raw", ["node-name"] = "r2", ["file"] = "f2" }))["return"].Should().NotBeNull();
        Error(await qmp.ExecuteAsync("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = "e", ["node-name"] = "r2", ["writable"] = true }))
            .Should().Be("Failed to get \"write\" lock");
    }

    private static string? Error(JsonObject reply) => (string?)reply["error"]?["desc"];

    /// <summary>Runs a daemon that must fail at start-up and returns what it printed.</summary>
    private static async Task<string> StartExpectingFailureAsync(string daemon, string imageDir, params string[] args)
    {
        var dir = DaemonProcess.NewDirectory();
        try
        {
            var psi = new ProcessStartInfo(daemon == Qsd ? Qsd : DaemonProcess.DaemonCommand[0])
            {
                UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = dir,
            };
            if (daemon != Qsd)
            {
                foreach (var a in DaemonProcess.DaemonCommand.Skip(1))
                {
                    psi.ArgumentList.Add(a);
                }
            }
            foreach (var a in args)
            {
                psi.ArgumentList.Add(a);
            }
            using var p = Process.Start(psi)!;
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            try
            {
                await p.WaitForExitAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
                p.Kill(entireProcessTree: true);
                throw new InvalidOperationException($"{daemon} started although the image is locked");
            }
            p.ExitCode.Should().NotBe(0);
            return await stdout + await stderr;
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>qemu-io holding <paramref name="image"/> open (sleeping) until disposed, once its locks are in place.</summary>
    private static async Task<IDisposable> HoldAsync(string image, params string[] options)
    {
        var psi = new ProcessStartInfo("qemu-io") { UseShellExecute = false, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var o in options)
        {
            psi.ArgumentList.Add(o);
        }
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add("sleep 120000");
        psi.ArgumentList.Add(image);
        var p = Process.Start(psi)!;
        var holder = new Holder(p);
        var inode = (await Tool.RunAsync("stat", "-c", "%i", image)).Trim();
        for (var i = 0; i < 200 && !File.ReadLines("/proc/locks").Any(l => l.Contains("OFDLCK", StringComparison.Ordinal) &&
            l.Contains(":" + inode + " ", StringComparison.Ordinal)); i++)
        {
            // Read stderr only once qemu-io is gone: while it runs, reading to the end waits out its sleep.
            if (p.HasExited)
            {
                p.HasExited.Should().BeFalse(await p.StandardError.ReadToEndAsync());
            }
            await Task.Delay(25);
        }
        return holder;
    }

    private sealed class Holder(Process process) : IDisposable
    {
        public void Dispose()
        {
            if (!process.HasExited)
            {
                process.Kill();
                process.WaitForExit();
            }
            process.Dispose();
        }
    }
}
