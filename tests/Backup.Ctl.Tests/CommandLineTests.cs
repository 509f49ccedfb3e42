using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.Ctl.Tests;

/// <summary>Connection choice, exit codes, --json, and the qmp, events and bitmap commands.</summary>
public class CommandLineTests
{
    [Fact]
    public async Task No_daemon_is_exit_code_3_with_a_clear_message()
    {
        var socket = Path.Combine(Path.GetTempPath(), "ctl-nobody-" + Guid.NewGuid().ToString("N")[..8] + ".sock");
        var run = await Ctl.RunAsync("--qmp", "unix:" + socket, "qmp", "query-version", "--json");
        run.ExitCode.Should().Be(ExitCodes.CannotConnect);
        run.Stderr.Should().Contain($"no backupd at unix:{socket}").And.Contain("--qmp");
        run.Json["ok"]!.GetValue<bool>().Should().BeFalse();
        run.Json["exit-code"]!.GetValue<int>().Should().Be(3);

        // The default is the demo daemon's socket under $BACKUPD_STATE_DIR.
        var state = Path.Combine(Path.GetTempPath(), "ctl-nostate-" + Guid.NewGuid().ToString("N")[..8]);
        var byDefault = await Ctl.RunAsync(new Dictionary<string, string?> { ["BACKUPD_STATE_DIR"] = state }, "qmp", "query-version");
        byDefault.ExitCode.Should().Be(3);
        byDefault.Stderr.Should().Contain($"no backupd at unix:{Path.Combine(state, "qmp.sock")}");
    }

    [Theory]
    [InlineData("backup", "full", "--dir", "x")]
    [InlineData("backup", "weekly", "--drive", "d", "--dir", "x")]
    [InlineData("chain", "restore", "x", "--drive", "d", "--to", "y", "--format", "vmdk")]
    [InlineData("--no-such-option")]
    [InlineData("--qmp", "bogus", "qmp", "query-version")]
    [InlineData("qmp", "query-version", "[1]", "--qmp", "unix:/nonexistent")]
    public async Task Usage_errors_are_exit_code_2(params string[] args)
    {
        var run = await Ctl.RunAsync([.. args, "--json"]);
        run.ExitCode.Should().Be(ExitCodes.Usage, run.ToString());
        run.Json["ok"]!.GetValue<bool>().Should().BeFalse();
    }

    [Fact]
    public async Task Help_lists_every_command()
    {
        var run = await Ctl.RunAsync("--help");
        run.ExitCode.Should().Be(0);
        run.Stdout.Should().Contain("backup").And.Contain("chain").And.Contain("bitmap").And.Contain("qmp").And.Contain("events")
            .And.Contain("--qmp").And.Contain("--config").And.Contain("--json");
    }

    [Fact]
    public async Task Default_socket_config_file_and_qmp_passthrough()
    {
        // A daemon whose QMP socket is where the demo daemon puts it: $BACKUPD_STATE_DIR/qmp.sock.
        await using var vm = await TwoDrives.StartAsync();
        var env = new Dictionary<string, string?> { ["BACKUPD_STATE_DIR"] = vm.Dir };
        var version = await Ctl.RunAsync(env, "qmp", "query-version", "--json");
        version.ExitCode.Should().Be(0, version.ToString());
        version.Json["return"]!["package"]!.GetValue<string>().Should().StartWith("backupd");

        // backupd's --config file: a chardev socket, or a qmp key.
        var chardevConfig = Path.Combine(vm.Dir, "chardev.json");
        await File.WriteAllTextAsync(chardevConfig, new JsonObject
        {
            ["chardev"] = $"socket,id=m,path={vm.Daemon.QmpSocket},server=on,wait=off",
            ["monitor"] = "chardev=m",
        }.ToJsonString());
        (await Ctl.OkAsync("--config", chardevConfig, "qmp", "query-jobs", "--json")).Json["return"]!.AsArray().Should().BeEmpty();
        var qmpConfig = Path.Combine(vm.Dir, "qmp.json");
        await File.WriteAllTextAsync(qmpConfig, new JsonObject { ["qmp"] = new JsonArray("unix:" + vm.Daemon.QmpSocket) }.ToJsonString());
        await Ctl.OkAsync("--config", qmpConfig, "qmp", "query-jobs");

        // Human output is the return value as indented JSON; errors carry QMP's class and text.
        var human = await Ctl.OkAsync("--qmp", vm.Qmp, "qmp", "query-named-block-nodes", "{\"flat\": true}");
        JsonNode.Parse(human.Stdout)!.AsArray().Select(n => n!["node-name"]!.GetValue<string>()).Should().Contain(["drive0", "drive1"]);
        var error = await Ctl.RunAsync("--qmp", vm.Qmp, "qmp", "block-dirty-bitmap-add", "{\"node\": \"nope\", \"name\": \"b\"}", "--json");
        error.ExitCode.Should().Be(1);
        error.Json["class"]!.GetValue<string>().Should().Be("GenericError");
        error.Json["desc"]!.GetValue<string>().Should().Be("Cannot find device='nope' nor node-name='nope'");
    }

    [Fact]
    public async Task Events_are_followed_one_json_object_per_line()
    {
        await using var vm = await TwoDrives.StartAsync();
        var events = Ctl.RunAsync("--qmp", vm.Qmp, "events", "--count", "5", "--timeout", "60", "--json");
        await using var qmp = await vm.Daemon.ConnectAsync();
        // The follower connects on its own; poll until its job events are what it reports.
        for (var i = 0; !events.IsCompleted && i < 100; i++)
        {
            await qmp.ExecuteAsync("blockdev-create", new JsonObject
            {
                ["job-id"] = $"c{i}",
                ["options"] = new JsonObject { ["driver"] = "file", ["filename"] = Path.Combine(vm.Dir, $"x{i}.img"), ["size"] = 0 },
            });
            await Task.Delay(100);
        }
        var run = await events;
        run.ExitCode.Should().Be(0, run.ToString());
        var lines = run.Stdout.TrimEnd('\n').Split('\n');
        lines.Should().HaveCount(6);
        lines[..5].Select(l => JsonNode.Parse(l)!["event"]!.GetValue<string>()).Should().AllBe("JOB_STATUS_CHANGE");
        lines[..5].Select(l => JsonNode.Parse(l)!["timestamp"]!["seconds"]!.GetValue<long>()).Should().AllSatisfy(s => s.Should().BePositive());
        run.Json["events"]!.GetValue<int>().Should().Be(5);
    }

    [Fact]
    public async Task Bitmaps_online()
    {
        await using var vm = await TwoDrives.StartAsync();
        await Ctl.OkAsync("--qmp", vm.Qmp, "qmp", "block-dirty-bitmap-add", "{\"node\": \"drive1\", \"name\": \"b0\"}");
        await vm.WriteAsync("drive1", "0x5a", "1M", "128k");

        var list = (await Ctl.OkAsync("--qmp", vm.Qmp, "bitmap", "list", "--json")).Json["bitmaps"]!.AsArray();
        var b0 = list.Single()!;
        b0["node"]!.GetValue<string>().Should().Be("drive1");
        b0["count"]!.GetValue<long>().Should().Be(128 << 10);
        b0["recording"]!.GetValue<bool>().Should().BeTrue();

        var inspect = (await Ctl.OkAsync("--qmp", vm.Qmp, "bitmap", "inspect", "b0", "--drive", "drive1", "--json")).Json["bitmap"]!;
        await using var qmp = await vm.Daemon.ConnectAsync();
        var sha = await qmp.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new { node = "drive1", name = "b0" });
        inspect["sha256"]!.GetValue<string>().Should().Be(sha["return"]!["sha256"]!.GetValue<string>());

        await Ctl.OkAsync("--qmp", vm.Qmp, "bitmap", "remove", "b0", "--drive", "drive1");
        (await Ctl.OkAsync("--qmp", vm.Qmp, "bitmap", "list", "--drive", "drive1", "--json")).Json["bitmaps"]!.AsArray().Should().BeEmpty();
        var again = await Ctl.RunAsync("--qmp", vm.Qmp, "bitmap", "remove", "b0", "--drive", "drive1", "--json");
        again.ExitCode.Should().Be(1);
        again.Json["desc"]!.GetValue<string>().Should().Be("Dirty bitmap 'b0' not found");
    }

    [Fact]
    public async Task Bitmaps_offline_in_a_qcow2_image_as_qemu_img_made_them()
    {
        var dir = DaemonProcess.NewDirectory();
        try
        {
            var image = Path.Combine(dir, "disk.qcow2");
            await Tool.RunAsync("qemu-img", "create", "-q", "-f", "qcow2", image, "64M");
            await Tool.RunAsync("qemu-img", "bitmap", "--add", "--granularity", "64k", image, "b0");
            await Tool.RunAsync("qemu-img", "bitmap", "--add", "--disable", image, "b1");
            // qemu-io opens the image with its bitmaps: the enabled one records the write.
            await Tool.RunAsync("qemu-io", "-f", "qcow2", image, "-c", "write -P 0x11 2M 192k");

            var list = (await Ctl.OkAsync("bitmap", "list", "--image", image, "--json")).Json["bitmaps"]!.AsArray();
            list.Select(b => b!["name"]!.GetValue<string>()).Should().BeEquivalentTo("b0", "b1");
            var b0 = list.Single(b => b!["name"]!.GetValue<string>() == "b0")!;
            b0["count"]!.GetValue<long>().Should().Be(192 << 10);
            b0["persistent"]!.GetValue<bool>().Should().BeTrue();
            list.Single(b => b!["name"]!.GetValue<string>() == "b1")!["count"]!.GetValue<long>().Should().Be(0);

            var inspect = (await Ctl.OkAsync("bitmap", "inspect", "b0", "--image", image, "--json")).Json["bitmap"]!;
            inspect["sha256"]!.GetValue<string>().Should().MatchRegex("^[0-9a-f]{64}$");

            await Ctl.OkAsync("bitmap", "remove", "b0", "--image", image);
            var info = JsonNode.Parse(await Tool.RunAsync("qemu-img", "info", "--output=json", image))!;
            info["format-specific"]!["data"]!["bitmaps"]!.AsArray().Select(b => b!["name"]!.GetValue<string>()).Should().Equal("b1");
            await Tool.RunAsync("qemu-img", "check", image);
            var missing = await Ctl.RunAsync("bitmap", "inspect", "b0", "--image", image);
            missing.ExitCode.Should().Be(1);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task On_a_terminal_a_backup_shows_a_progress_bar_per_drive()
    {
        await using var vm = await TwoDrives.StartAsync();
        var dir = Path.Combine(vm.Dir, "backups");
        var run = await Ctl.RunAsync(null, interactive: true, "--qmp", vm.Qmp, "backup", "full", "--drive", "drive0", "--drive", "drive1", "--dir", dir);
        run.ExitCode.Should().Be(0, run.ToString());
        run.Stdout.Should().Contain("drive0 → drive0-0001-full.qcow2").And.Contain("drive1 → drive1-0001-full.qcow2").And.Contain("100%");
        run.Stdout.Should().Contain("full backup 1 of drive0, drive1 done");
    }
}
