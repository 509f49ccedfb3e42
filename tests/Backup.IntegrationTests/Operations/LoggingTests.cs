using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests.Operations;

/// <summary>
/// The log of a backup session tells what happened: every QMP command (debug), each job's start, progress,
/// completion, failure and cancel with job id, node and bytes as properties; secrets never appear. Read
/// back as compact JSON (--log-format json), so the test checks properties, not wording.
/// </summary>
public class LoggingTests
{
    private const long MiB = 1 << 20;
    private const string Secret = "s3cret-never-in-the-log";

    private static List<JsonObject> ReadClef(string path) =>
        File.ReadAllLines(path).Where(l => l.Length > 0).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();

    private static string? Prop(JsonObject e, string name) => e[name]?.ToString();

    private static async Task WaitForJobGoneAsync(QmpClient qmp, string job)
    {
        while (true)
        {
            var e = await qmp.NextEventAsync(TimeSpan.FromSeconds(60));
            if (e["event"]!.GetValue<string>() == "JOB_STATUS_CHANGE" && e["data"]!["id"]!.GetValue<string>() == job
                && e["data"]!["status"]!.GetValue<string>() == "null")
            {
                return;
            }
        }
    }

    private static async Task OkAsync(QmpClient qmp, string command, JsonObject args)
    {
        var reply = await qmp.ExecuteAsync(command, args);
        reply.Should().ContainKey("return", reply.ToJsonString());
    }

    [Fact]
    public async Task The_log_of_a_backup_session_tells_the_story()
    {
        var dir = DaemonProcess.NewDirectory();
        var disk = Path.Combine(dir, "disk.raw");
        await using (var f = File.Create(disk))
        {
            var data = new byte[MiB];
            Array.Fill(data, (byte)0x5a);
            for (var i = 0; i < 32; i++)
            {
                await f.WriteAsync(data);
            }
            f.SetLength(64 * MiB);
        }
        var log = Path.Combine(dir, "backupd.log");
        await using var d = await DaemonProcess.StartAsync(
            ["--blockdev", $"driver=raw,node-name=drive0,file.driver=file,file.filename={disk}",
             "--log-level", "debug", "--log-format", "json", "--log-file", log], dir);
        await using var qmp = await d.ConnectAsync();

        await OkAsync(qmp, "object-add", new JsonObject { ["qom-type"] = "secret", ["id"] = "sec0", ["data"] = Secret });
        await OkAsync(qmp, "block-dirty-bitmap-add", new JsonObject { ["node"] = "drive0", ["name"] = "b0" });
        await OkAsync(qmp, "drive-backup", new JsonObject
        {
            ["job-id"] = "full0", ["device"] = "drive0", ["sync"] = "full", ["format"] = "qcow2",
            ["target"] = Path.Combine(dir, "full.qcow2"),
        });
        await WaitForJobGoneAsync(qmp, "full0");

        // A job that fails: its target refuses every write.
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", Path.Combine(dir, "bad.raw"), "64M");
        var bad = JsonNode.Parse("""
            {"driver": "raw", "node-name": "bad", "file": {"driver": "blkdebug", "inject-error": [{"event": "write_aio"}]}}
            """)!.AsObject();
        bad["file"]!["image"] = new JsonObject { ["driver"] = "file", ["filename"] = Path.Combine(dir, "bad.raw") };
        await OkAsync(qmp, "blockdev-add", bad);
        await OkAsync(qmp, "blockdev-backup", new JsonObject { ["job-id"] = "fail0", ["device"] = "drive0", ["target"] = "bad", ["sync"] = "full" });
        await WaitForJobGoneAsync(qmp, "fail0");

        // A job that is cancelled: slow enough to be caught running.
        await Tool.RunAsync("qemu-img", "create", "-q", "-f", "raw", Path.Combine(dir, "slow.raw"), "64M");
        await OkAsync(qmp, "blockdev-add", new JsonObject
        {
            ["driver"] = "raw", ["node-name"] = "slow",
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = Path.Combine(dir, "slow.raw") },
        });
        await OkAsync(qmp, "blockdev-backup", new JsonObject
        {
            ["job-id"] = "cancel0", ["device"] = "drive0", ["target"] = "slow", ["sync"] = "full", ["speed"] = 1 * MiB,
        });
        await OkAsync(qmp, "block-job-cancel", new JsonObject { ["device"] = "cancel0" });
        await WaitForJobGoneAsync(qmp, "cancel0");

        // A command that fails is in the log with QEMU's error.
        (await qmp.ExecuteAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = "nosuch", ["name"] = "x" })).Should().ContainKey("error");

        (await qmp.ExecuteAsync("quit")).Should().ContainKey("return");
        (await d.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);

        var text = await File.ReadAllTextAsync(log);
        text.Should().NotContain(Secret, "a secret's data is never logged");
        var events = ReadClef(log);
        events.Should().OnlyContain(e => e.ContainsKey("@t") && e.ContainsKey("@mt"));

        JsonObject First(Func<JsonObject, bool> match, string what) =>
            events.FirstOrDefault(match) ?? throw new Xunit.Sdk.XunitException($"no log event for {what} in:\n{text}");
        int IndexOf(JsonObject e) => events.IndexOf(e);

        var commands = events.Where(e => Prop(e, "Command") is not null && e.ContainsKey("Client") && !e.ContainsKey("ErrorClass")).ToList();
        commands.Select(e => Prop(e, "Command")).Should().ContainInOrder(
            "qmp_capabilities", "object-add", "block-dirty-bitmap-add", "drive-backup", "blockdev-add", "blockdev-backup",
            "blockdev-add", "blockdev-backup", "block-job-cancel", "block-dirty-bitmap-add", "quit");
        commands.Should().OnlyContain(e => Prop(e, "@l") == "Debug");
        Prop(commands.First(e => Prop(e, "Command") == "object-add"), "Arguments").Should().Contain("<redacted>");

        var started = First(e => Prop(e, "JobId") == "full0" && Prop(e, "@mt")!.Contains("started", StringComparison.Ordinal), "full0 started");
        Prop(started, "Node").Should().Be("drive0");
        Prop(started, "JobType").Should().Be("backup");
        Prop(started, "TotalBytes").Should().Be((64 * MiB).ToString(System.Globalization.CultureInfo.InvariantCulture));
        Prop(started, "Details").Should().Contain("sync full");
        var completed = First(e => Prop(e, "JobId") == "full0" && Prop(e, "@mt")!.Contains("completed", StringComparison.Ordinal), "full0 completed");
        Prop(completed, "Bytes").Should().Be((64 * MiB).ToString(System.Globalization.CultureInfo.InvariantCulture));
        Prop(completed, "Node").Should().Be("drive0");
        IndexOf(completed).Should().BeGreaterThan(IndexOf(started));
        var progress = events.Where(e => Prop(e, "JobId") == "full0" && e.ContainsKey("Percent")).ToList();
        progress.Should().NotBeEmpty("a job's progress is logged by quarters");
        var (startedAt, completedAt) = (IndexOf(started), IndexOf(completed));
        progress.Select(IndexOf).Should().OnlyContain(i => i > startedAt && i < completedAt);
        progress.Select(e => int.Parse(Prop(e, "Percent")!, System.Globalization.CultureInfo.InvariantCulture)).Should().BeInAscendingOrder()
            .And.OnlyContain(p => p == 25 || p == 50 || p == 75);

        var failed = First(e => Prop(e, "JobId") == "fail0" && Prop(e, "@mt")!.Contains("failed", StringComparison.Ordinal), "fail0 failed");
        Prop(failed, "@l").Should().Be("Warning");
        Prop(failed, "Error").Should().Be("Input/output error");
        Prop(failed, "Node").Should().Be("drive0");
        First(e => Prop(e, "JobId") == "fail0" && Prop(e, "Operation") == "write", "fail0's write error");

        var cancelled = First(e => Prop(e, "JobId") == "cancel0" && Prop(e, "@mt")!.Contains("cancelled", StringComparison.Ordinal), "cancel0 cancelled");
        Prop(cancelled, "Node").Should().Be("drive0");
        cancelled.Should().ContainKey("Bytes");

        var refused = First(e => Prop(e, "ErrorClass") is not null, "the failed command");
        Prop(refused, "Command").Should().Be("block-dirty-bitmap-add");
        Prop(refused, "Error").Should().Contain("nosuch");

        // Block: nodes open and close under their names.
        First(e => Prop(e, "Node") == "drive0" && Prop(e, "Driver") == "raw", "drive0 opened");
        First(e => Prop(e, "Driver") == "copy-before-write", "the backup filter");
        First(e => Prop(e, "Node") == "drive0" && Prop(e, "@mt")!.Contains("closed", StringComparison.Ordinal), "drive0 closed");
    }

    [Fact]
    public async Task Json_format_writes_one_clef_object_per_stderr_line()
    {
        var dir = DaemonProcess.NewDirectory();
        await using var d = await DaemonProcess.StartAsync(["--log-level", "info", "--log-format", "json"], dir);
        await using (var qmp = await d.ConnectAsync())
        {
            (await qmp.ExecuteAsync("quit")).Should().ContainKey("return");
        }
        (await d.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);
        await Task.Delay(200); // stderr is collected asynchronously
        var lines = d.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        lines.Should().NotBeEmpty();
        foreach (var line in lines)
        {
            var e = JsonNode.Parse(line)!.AsObject();
            e.Should().ContainKey("@t").And.ContainKey("@mt").And.ContainKey("SourceContext");
        }
        lines.Should().Contain(l => l.Contains("\"Listeners\":1", StringComparison.Ordinal));
    }

    [Fact]
    public async Task A_bad_log_format_is_one_line_and_exit_status_1()
    {
        var (code, _, stderr) = await DaemonProcess.RunAsync(["--log-format", "xml"]);
        code.Should().Be(1);
        stderr.Trim().Should().Be("backupd: --log-format xml: expected text or json");
    }

    /// <summary>
    /// Under systemd, stderr is the journal's stream and JOURNAL_STREAM names it: lines carry a syslog
    /// priority and no time of their own. The shell sets the variable to its stderr's device and inode,
    /// as systemd does; a variable inherited by a process whose stderr goes elsewhere changes nothing.
    /// </summary>
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task On_the_journal_stream_lines_have_syslog_priorities_and_no_time(bool matching)
    {
        var dir = DaemonProcess.NewDirectory();
        var stream = matching ? "$(stat -L -c %d:%i /proc/self/fd/2)" : "0:1";
        await using var d = await DaemonProcess.StartAsync(
            ["-c", $"export JOURNAL_STREAM={stream}; exec dotnet \"$@\"", "sh", DaemonProcess.DaemonDll, "--log-level", "debug"],
            dir, executable: "sh");
        await using (var qmp = await d.ConnectAsync())
        {
            (await qmp.ExecuteAsync("quit")).Should().ContainKey("return");
        }
        (await d.WaitForExitAsync(TimeSpan.FromSeconds(30))).Should().Be(0);
        await Task.Delay(200); // stderr is collected asynchronously
        var lines = d.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        lines.Should().NotBeEmpty();
        if (matching)
        {
            lines.Should().OnlyContain(l => System.Text.RegularExpressions.Regex.IsMatch(l, @"^<[2-7]>[A-Za-z.]+: "), d.Stderr);
            lines.Should().Contain(l => l.StartsWith("<6>Backup.Qmp: QMP listening on", StringComparison.Ordinal));
            lines.Should().Contain(l => l.StartsWith("<7>Backup.Qmp: QMP ", StringComparison.Ordinal));
            d.Stderr.Should().NotContain("\u001b[");
        }
        else
        {
            lines.Should().Contain(l => l.Contains("[INF] Backup.Qmp: QMP listening on", StringComparison.Ordinal));
        }
    }
}
