using System.Globalization;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;

namespace Backup.Ctl.Tests;

/// <summary>
/// What a new user does with backupctl alone: a full, two incrementals and a differential of two drives while a
/// guest writes through NBD; list, verify, and restore each backup, compared with qemu-img against snapshots
/// taken at each backup's instant.
/// </summary>
public class BackupChainTests
{
    [Theory]
    [InlineData(null)]
    [InlineData("qemu-storage-daemon")]
    public async Task Full_two_incrementals_and_a_differential_of_two_drives_restore_to_what_the_drives_held(string? daemon)
    {
        // backupctl speaks plain QMP (sync bitmap with bitmap-mode never for diff), so it drives QSD the same way.
        await using var vm = await TwoDrives.StartAsync(daemon);
        var dir = Path.Combine(vm.Dir, "backups");
        var snapshots = new Dictionary<(int Sequence, string Drive), string>();
        string[] Drives() => ["--drive", "drive0", "--drive", "drive1"];

        // Each round: the guest writes, the drives' content is snapshot through NBD, the backup is made. Nothing
        // writes in between, so each backup must equal its snapshot.
        var rounds = new (string Kind, string Pattern, string Offset, string Length)[]
        {
            ("full", "0x11", "0", "8M"),
            ("inc", "0x22", "1M", "64k"),
            ("inc", "0x33", "40M", "3M"),
            ("diff", "0x44", "63M", "1M"),
        };
        var results = new List<JsonObject>();
        for (var i = 0; i < rounds.Length; i++)
        {
            var (kind, pattern, offset, length) = rounds[i];
            foreach (var drive in TwoDrives.Names)
            {
                await vm.WriteAsync(drive, pattern, offset, length);
                snapshots[(i + 1, drive)] = await vm.SnapshotAsync(drive, $"snap{i + 1}-{drive}");
            }
            var run = await Ctl.OkAsync(["--qmp", vm.Qmp, "backup", kind, .. Drives(), "--dir", dir, "--json"]);
            results.Add(run.Json);
        }

        results.Select(r => r["ok"]!.GetValue<bool>()).Should().AllBeEquivalentTo(true);
        results.Select(r => r["kind"]!.GetValue<string>()).Should().Equal("full", "inc", "inc", "diff");
        // What each backup copied: everything, then only the round's writes, then (diff) everything since the full.
        long Copied(int i, string drive) => results[i]["drives"]!.AsArray().Single(d => d!["drive"]!.GetValue<string>() == drive)!["copied"]!.GetValue<long>();
        Copied(0, "drive0").Should().Be(TwoDrives.Size);
        Copied(1, "drive0").Should().Be(64 << 10);
        Copied(2, "drive1").Should().Be(3 << 20);
        Copied(3, "drive0").Should().Be((64 << 10) + (3 << 20) + (1 << 20));
        results[3]["drives"]![0]!["chain"]!.AsArray().Select(c => c!.GetValue<string>())
            .Should().Equal("drive0-0001-full.qcow2", "drive0-0004-diff.qcow2");
        results[2]["drives"]![1]!["chain"]!.AsArray().Select(c => c!.GetValue<string>())
            .Should().Equal("drive1-0001-full.qcow2", "drive1-0002-inc.qcow2", "drive1-0003-inc.qcow2");

        // Every image is a qcow2 with the right backing file, as qemu-img sees it.
        var info = JsonNode.Parse(await Tool.RunAsync("qemu-img", "info", "--output=json", Path.Combine(dir, "drive1-0003-inc.qcow2")))!;
        info["backing-filename"]!.GetValue<string>().Should().Be("drive1-0002-inc.qcow2");
        info["backing-filename-format"]!.GetValue<string>().Should().Be("qcow2");
        await Tool.RunAsync("qemu-img", "check", Path.Combine(dir, "drive0-0004-diff.qcow2"));

        var list = (await Ctl.OkAsync("chain", "list", dir, "--json")).Json;
        list["backups"]!.AsArray().Select(b => b!["sequence"]!.GetValue<int>()).Should().Equal(1, 2, 3, 4);
        list["backups"]![1]!["drives"]![0]!["file-size"]!.GetValue<long>().Should().BePositive();
        (await Ctl.OkAsync("chain", "list", dir)).Stdout.Should().Contain("drive1-0003-inc.qcow2");

        var verify = await Ctl.OkAsync("chain", "verify", dir, "--json");
        verify.Json["backups"]!.GetValue<int>().Should().Be(4);

        // Restore every drive as of every backup and compare with the snapshot of that instant.
        foreach (var ((sequence, drive), snapshot) in snapshots)
        {
            var to = Path.Combine(vm.Dir, $"restored{sequence}-{drive}.raw");
            await Ctl.OkAsync("chain", "restore", dir, "--drive", drive, "--to", to, "--at", sequence.ToString(CultureInfo.InvariantCulture));
            (await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", to, snapshot)).Should().Contain("Images are identical");
        }

        // --at a time picks the newest backup made at or before it; a qcow2 restore is a valid qcow2 image.
        var time = results[1]["time"]!.GetValue<string>();
        var at = Path.Combine(vm.Dir, "at-time.qcow2");
        var restored = await Ctl.OkAsync("chain", "restore", dir, "--drive", "drive1", "--to", at, "--at", time, "--json");
        restored.Json["sequence"]!.GetValue<int>().Should().Be(2);
        restored.Json["format"]!.GetValue<string>().Should().Be("qcow2");
        await Tool.RunAsync("qemu-img", "check", at);
        (await Tool.RunAsync("qemu-img", "compare", "-F", "raw", at, snapshots[(2, "drive1")])).Should().Contain("Images are identical");

        // Without --at, the newest backup: the differential.
        var latest = Path.Combine(vm.Dir, "latest.raw");
        await Ctl.OkAsync("chain", "restore", dir, "--drive", "drive0", "--to", latest);
        await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", latest, snapshots[(4, "drive0")]);
    }

    [Fact]
    public async Task Verify_names_the_image_and_offset_of_a_difference()
    {
        await using var vm = await TwoDrives.StartAsync();
        var dir = Path.Combine(vm.Dir, "backups");
        await vm.WriteAsync("drive0", "0x11", "0", "1M");
        await Ctl.OkAsync("--qmp", vm.Qmp, "backup", "full", "--drive", "drive0", "--dir", dir);
        await vm.WriteAsync("drive0", "0x22", "5M", "64k");
        await Ctl.OkAsync("--qmp", vm.Qmp, "backup", "inc", "--drive", "drive0", "--dir", dir);

        // Flip a byte of the incremental's data cluster on disk, where qemu-img map says guest offset 5M lives.
        var inc = Path.Combine(dir, "drive0-0002-inc.qcow2");
        var map = JsonNode.Parse(await Tool.RunAsync("qemu-img", "map", "--output=json", inc))!.AsArray();
        var extent = map.Single(e => e!["depth"]!.GetValue<int>() == 0 && e["data"]!.GetValue<bool>())!;
        extent["start"]!.GetValue<long>().Should().Be(5 << 20);
        await using (var f = new FileStream(inc, FileMode.Open, FileAccess.Write))
        {
            f.Position = extent["offset"]!.GetValue<long>() + 100;
            f.WriteByte(0x99);
        }

        var run = await Ctl.RunAsync("chain", "verify", dir, "--json");
        run.ExitCode.Should().Be(1, run.ToString());
        var problem = run.Json["problems"]!.AsArray().Single()!;
        problem["image"]!.GetValue<string>().Should().Be("drive0-0002-inc.qcow2");
        problem["offset"]!.GetValue<long>().Should().Be(5 << 20);
        problem["sequence"]!.GetValue<int>().Should().Be(2);
        run.Stderr.Should().Contain("drive0-0002-inc.qcow2 at offset 5242880");

        // A restore of that backup refuses to write content that is not what was backed up.
        var refused = await Ctl.RunAsync("chain", "restore", dir, "--drive", "drive0", "--to", Path.Combine(vm.Dir, "r.raw"));
        refused.ExitCode.Should().Be(1);
        File.Exists(Path.Combine(vm.Dir, "r.raw")).Should().BeFalse();
        // The full backup alone is still good.
        await Ctl.OkAsync("chain", "restore", dir, "--drive", "drive0", "--to", Path.Combine(vm.Dir, "r1.raw"), "--at", "1");
    }

    [Fact]
    [System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
    public async Task A_failed_incremental_says_the_bitmap_kept_everything_and_the_next_one_is_complete()
    {
        await using var vm = await TwoDrives.StartAsync();
        var dir = Path.Combine(vm.Dir, "backups");
        await vm.WriteAsync("drive0", "0x11", "0", "1M");
        await Ctl.OkAsync("--qmp", vm.Qmp, "backup", "full", "--drive", "drive0", "--drive", "drive1", "--dir", dir);
        await vm.WriteAsync("drive0", "0x22", "2M", "1M");
        await vm.WriteAsync("drive1", "0x23", "3M", "64k");

        await using (await ReadOnlyFolder.MakeAsync(dir))
        {
            var failed = await Ctl.RunAsync("--qmp", vm.Qmp, "backup", "inc", "--drive", "drive0", "--drive", "drive1", "--dir", dir, "--json");
            failed.ExitCode.Should().Be(1, failed.ToString());
            failed.Json["ok"]!.GetValue<bool>().Should().BeFalse();
            failed.Json["error"]!.GetValue<string>().Should().Contain("the bitmap kept every change")
                .And.Contain("'backupctl-inc' on drive0 holds 1 MiB").And.Contain("'backupctl-inc' on drive1 holds 64 KiB");
            failed.Stderr.Should().MatchRegex("Permission denied|Operation not permitted");
            failed.Json["bitmaps"]!.AsArray().Should().Contain(b => b!["bitmap"]!.GetValue<string>() == "backupctl-inc" && b["count"]!.GetValue<long>() == 1 << 20);
        }
        Directory.GetFiles(dir, "*-0002-*").Should().BeEmpty("a failed backup leaves no image and no manifest");

        await vm.WriteAsync("drive0", "0x24", "4M", "64k");
        var snapshot = await vm.SnapshotAsync("drive0", "after");
        var inc = await Ctl.OkAsync("--qmp", vm.Qmp, "backup", "inc", "--drive", "drive0", "--drive", "drive1", "--dir", dir, "--json");
        inc.Json["drives"]![0]!["copied"]!.GetValue<long>().Should().Be((1 << 20) + (64 << 10));
        var to = Path.Combine(vm.Dir, "r.raw");
        await Ctl.OkAsync("chain", "restore", dir, "--drive", "drive0", "--to", to);
        await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", to, snapshot);
        await Ctl.OkAsync("chain", "verify", dir);
    }

    [Fact]
    public async Task A_job_that_fails_midway_leaves_no_images_and_the_bitmap_with_everything()
    {
        await using var vm = await TwoDrives.StartAsync();
        var dir = Path.Combine(vm.Dir, "backups");
        await Ctl.OkAsync("--qmp", vm.Qmp, "backup", "full", "--drive", "drive0", "--drive", "drive1", "--dir", dir);
        await vm.WriteAsync("drive0", "0x31", "0", "48M");
        await vm.WriteAsync("drive1", "0x32", "0", "64k");

        // Another client stops the incremental's job as soon as it exists: pause it, then cancel it. Grouped,
        // the other drive's job is cancelled with it, and both bitmaps get their bits back. At 1 MiB/s the
        // 48 MiB would take most of a minute, so the cancel lands midway however busy the machine is.
        await using var qmp = await vm.Daemon.ConnectAsync();
        var backup = Ctl.RunAsync("--qmp", vm.Qmp, "backup", "inc", "--drive", "drive0", "--drive", "drive1", "--dir", dir, "--json",
            "--speed", (1 << 20).ToString(System.Globalization.CultureInfo.InvariantCulture));
        while (true)
        {
            var e = await qmp.NextEventAsync(TimeSpan.FromSeconds(60));
            if (e["event"]!.GetValue<string>() == "JOB_STATUS_CHANGE" && e["data"]!["id"]!.GetValue<string>() == "backupctl-2-drive0")
            {
                await qmp.ExecuteAsync("job-pause", new { id = "backupctl-2-drive0" });
                var jobs = (await qmp.ExecuteAsync("query-block-jobs"))["return"]!.AsArray();
                jobs.Select(j => j!["speed"]!.GetValue<long>()).Should().Equal(1 << 20, 1 << 20);
                await qmp.ExecuteAsync("job-cancel", new { id = "backupctl-2-drive0" });
                break;
            }
        }
        var run = await backup;
        run.ExitCode.Should().Be(1, run.ToString());
        run.Json["stage"]!.GetValue<string>().Should().Be("jobs");
        run.Json["error"]!.GetValue<string>().Should().StartWith("inc backup failed (drive0: cancelled")
            .And.Contain("its images were removed and the bitmap kept every change ('backupctl-inc' on drive0 holds 48 MiB, 'backupctl-inc' on drive1 holds 64 KiB)");
        Directory.GetFiles(dir, "*-0002-*").Should().BeEmpty();

        var snapshot = await vm.SnapshotAsync("drive0", "after");
        var inc = await Ctl.OkAsync("--qmp", vm.Qmp, "backup", "inc", "--drive", "drive0", "--drive", "drive1", "--dir", dir, "--json");
        inc.Json["drives"]![0]!["copied"]!.GetValue<long>().Should().Be(48 << 20);
        var to = Path.Combine(vm.Dir, "r.raw");
        await Ctl.OkAsync("chain", "restore", dir, "--drive", "drive0", "--to", to);
        await Tool.RunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", to, snapshot);
    }
}
