using System.Text.Json;
using Backup.Block;
using Backup.Nbd.Tests.Support;

namespace Backup.Nbd.Tests;

/// <summary>Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) against the in-process server.</summary>
public sealed class InteropTests
{
    private const int MiB = 1 << 20;

    /// <summary>Data at 1 MiB (256 KiB of 0xAB) and 3 MiB (64 KiB of 0xCD); the rest are holes.</summary>
    private static void Sparse(FileStream fs)
    {
        fs.Position = MiB;
        fs.Write(Enumerable.Repeat((byte)0xAB, 256 * 1024).ToArray());
        fs.Position = 3 * MiB;
        fs.Write(Enumerable.Repeat((byte)0xCD, 64 * 1024).ToArray());
    }

    [Fact]
    public async Task QemuIo_writes_and_reads_back_a_pattern()
    {
        await using var f = NbdFixture.Create();
        var (_, file) = await f.AddRawNodeAsync("disk0", 4 * MiB);
        f.Export("e0", "disk0", writable: true);

        var r = await Tools.MustRunAsync("qemu-io", "-f", "raw", f.Uri("disk0"),
            "-c", "write -P 0x55 0 64k", "-c", "read -P 0x55 0 64k", "-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M",
            "-c", "write -f -P 0x66 2M 4k", "-c", "flush", "-c", "discard 3M 64k", "-c", "aio_write -P 0x77 128k 4k",
            "-c", "aio_flush");
        r.All.Should().NotContain("failed").And.NotContain("error");

        var bytes = await File.ReadAllBytesAsync(file);
        bytes.AsSpan(0, 65536).IndexOfAnyExcept((byte)0x55).Should().Be(-1);
        bytes.AsSpan(128 * 1024, 4096).IndexOfAnyExcept((byte)0x77).Should().Be(-1);
        bytes.AsSpan(2 * MiB, 4096).IndexOfAnyExcept((byte)0x66).Should().Be(-1);
    }

    [Fact]
    public async Task QemuImg_compare_sees_the_export_equal_to_its_file()
    {
        await using var f = NbdFixture.Create();
        var (_, file) = await f.AddRawNodeAsync("disk0", 4 * MiB, fill: Sparse);
        f.Export("e0", "disk0");
        await Tools.MustRunAsync("qemu-img", "compare", "-f", "raw", "-F", "raw", f.Uri("disk0"), file);
    }

    [Fact]
    public async Task QemuImg_convert_copies_the_export()
    {
        await using var f = NbdFixture.Create();
        var (_, file) = await f.AddRawNodeAsync("disk0", 4 * MiB, fill: Sparse);
        f.Export("e0", "disk0", name: "exp");
        var qcow2 = Path.Combine(f.Dir, "copy.qcow2");
        await Tools.MustRunAsync("qemu-img", "convert", "-f", "raw", "-O", "qcow2", f.Uri("exp"), qcow2);
        await Tools.MustRunAsync("qemu-img", "compare", "-f", "qcow2", "-F", "raw", qcow2, file);
        // Holes were sent as holes: only the 320 KiB of data got allocated in the copy.
        var map = await Tools.MustRunAsync("qemu-img", "map", "--output=json", "-f", "qcow2", qcow2);
        var data = JsonDocument.Parse(map.Stdout).RootElement.EnumerateArray()
            .Where(e => e.GetProperty("data").GetBoolean()).Sum(e => e.GetProperty("length").GetInt64());
        data.Should().Be(320 * 1024);
    }

    [Fact]
    public async Task Nbdinfo_lists_exports_with_descriptions()
    {
        await using var f = NbdFixture.Create();
        await f.AddRawNodeAsync("disk0", 4 * MiB);
        await f.AddRawNodeAsync("disk1", 1 * MiB);
        f.Export("e0", "disk0", description: "the first disk");
        f.Export("e1", "disk1", name: "second", writable: true);

        var r = await Tools.MustRunAsync("nbdinfo", "--list", "--json", $"nbd+unix://?socket={f.SocketPath}");
        var exports = JsonDocument.Parse(r.Stdout).RootElement.GetProperty("exports").EnumerateArray().ToList();
        exports.Select(e => e.GetProperty("export-name").GetString()).Should().BeEquivalentTo("disk0", "second");
        var first = exports.Single(e => e.GetProperty("export-name").GetString() == "disk0");
        first.GetProperty("description").GetString().Should().Be("the first disk");
        first.GetProperty("export-size").GetInt64().Should().Be(4 * MiB);
        first.GetProperty("is_read_only").GetBoolean().Should().BeTrue();
        first.GetProperty("can_multi_conn").GetBoolean().Should().BeTrue();
        var second = exports.Single(e => e.GetProperty("export-name").GetString() == "second");
        second.GetProperty("is_read_only").GetBoolean().Should().BeFalse();
        second.GetProperty("can_flush").GetBoolean().Should().BeTrue();
        second.GetProperty("can_fua").GetBoolean().Should().BeTrue();
        second.GetProperty("can_trim").GetBoolean().Should().BeTrue();
        second.GetProperty("can_zero").GetBoolean().Should().BeTrue();
        second.GetProperty("can_fast_zero").GetBoolean().Should().BeTrue();
        second.GetProperty("can_cache").GetBoolean().Should().BeTrue();
        second.GetProperty("can_df").GetBoolean().Should().BeTrue();
        second.GetProperty("block_size_maximum").GetInt64().Should().Be(32 * MiB);
        second.GetProperty("contexts").EnumerateArray().Select(c => c.GetString()).Should().Equal("base:allocation");
    }

    [Fact]
    public async Task Nbdinfo_map_reports_base_allocation()
    {
        await using var f = NbdFixture.Create();
        await f.AddRawNodeAsync("disk0", 4 * MiB, fill: Sparse);
        f.Export("e0", "disk0");
        var r = await Tools.MustRunAsync("nbdinfo", "--map", "--json", f.Uri("disk0"));
        var map = JsonDocument.Parse(r.Stdout).RootElement.EnumerateArray()
            .Select(e => (e.GetProperty("offset").GetInt64(), e.GetProperty("length").GetInt64(), e.GetProperty("type").GetInt32())).ToList();
        map.Should().Equal(
            (0L, (long)MiB, 3),
            ((long)MiB, 256L * 1024, 0),
            (MiB + 256L * 1024, 2L * MiB - 256 * 1024, 3),
            (3L * MiB, 64L * 1024, 0),
            (3L * MiB + 64 * 1024, (long)MiB - 64 * 1024, 3));
    }

    [Fact]
    public async Task Nbdinfo_map_reports_allocation_depth_when_exported()
    {
        await using var f = NbdFixture.Create();
        await f.AddRawNodeAsync("disk0", 4 * MiB, fill: Sparse);
        f.Export("e0", "disk0", allocationDepth: true);
        var contexts = await Tools.MustRunAsync("nbdinfo", "--json", f.Uri("disk0"));
        JsonDocument.Parse(contexts.Stdout).RootElement.GetProperty("exports")[0].GetProperty("contexts").EnumerateArray()
            .Select(c => c.GetString()).Should().Equal("base:allocation", "qemu:allocation-depth");
        var r = await Tools.MustRunAsync("nbdinfo", "--map=qemu:allocation-depth", "--json", f.Uri("disk0"));
        var map = JsonDocument.Parse(r.Stdout).RootElement.EnumerateArray().ToList();
        map.Should().ContainSingle().Which.GetProperty("type").GetInt32().Should().Be(1);
    }

    [Fact]
    public async Task Nbdcopy_copies_from_and_to_exports()
    {
        await using var f = NbdFixture.Create();
        var (_, src) = await f.AddRawNodeAsync("src", 8 * MiB, fill: fs =>
        {
            var rnd = new Random(5);
            var buf = new byte[MiB];
            rnd.NextBytes(buf);
            fs.Position = 2 * MiB;
            fs.Write(buf);
        });
        var (_, dst) = await f.AddRawNodeAsync("dst", 8 * MiB);
        f.Export("esrc", "src");
        f.Export("edst", "dst", writable: true);

        var local = Path.Combine(f.Dir, "local.img");
        await Tools.MustRunAsync("nbdcopy", f.Uri("src"), local);
        (await File.ReadAllBytesAsync(local)).Should().Equal(await File.ReadAllBytesAsync(src));

        await Tools.MustRunAsync("nbdcopy", "--connections=4", "--requests=16", local, f.Uri("dst"));
        (await File.ReadAllBytesAsync(dst)).Should().Equal(await File.ReadAllBytesAsync(src));

        // Export to export, as a backup pipeline would.
        var (_, dst2) = await f.AddRawNodeAsync("dst2", 8 * MiB);
        f.Export("edst2", "dst2", writable: true);
        await Tools.MustRunAsync("nbdcopy", "--flush", f.Uri("src"), f.Uri("dst2"));
        (await File.ReadAllBytesAsync(dst2)).Should().Equal(await File.ReadAllBytesAsync(src));
    }

    [Fact]
    public async Task Many_clients_write_concurrently_to_one_export()
    {
        await using var f = NbdFixture.Create();
        var (_, file) = await f.AddRawNodeAsync("disk0", 16 * MiB);
        f.Export("e0", "disk0", writable: true);
        var clients = Enumerable.Range(0, 6).Select(i =>
        {
            var args = new List<string> { "-f", "raw", f.Uri("disk0") };
            for (var k = 0; k < 32; k++)
            {
                args.AddRange(["-c", $"aio_write -P {0x10 + i} {i * 2 * MiB + k * 64 * 1024} 64k"]);
            }
            args.AddRange(["-c", "aio_flush", "-c", $"read -P {0x10 + i} {i * 2 * MiB} 2M"]);
            return Tools.MustRunAsync("qemu-io", [.. args]);
        }).ToList();
        var results = await Task.WhenAll(clients);
        results.Should().OnlyContain(r => !r.All.Contains("fail", StringComparison.OrdinalIgnoreCase));
        var bytes = await File.ReadAllBytesAsync(file);
        for (var i = 0; i < 6; i++)
        {
            bytes.AsSpan(i * 2 * MiB, 2 * MiB).IndexOfAnyExcept((byte)(0x10 + i)).Should().Be(-1);
        }
    }

    [Fact]
    public async Task Read_only_export_refuses_writes_with_EPERM()
    {
        await using var f = NbdFixture.Create();
        var (_, file) = await f.AddRawNodeAsync("disk0", 1 * MiB);
        f.Export("e0", "disk0");
        var r = await Tools.RunAsync("qemu-io", "-f", "raw", f.Uri("disk0"), "-c", "write -P 0x55 0 4k");
        r.All.Should().Contain("Permission denied");
        (await File.ReadAllBytesAsync(file)).Should().OnlyContain(b => b == 0);
        // Opening read-only works and reads.
        await Tools.MustRunAsync("qemu-io", "-r", "-f", "raw", f.Uri("disk0"), "-c", "read -P 0 0 1M");
    }

    [Fact]
    public async Task Unknown_export_name_is_refused()
    {
        await using var f = NbdFixture.Create();
        await f.AddRawNodeAsync("disk0", 1 * MiB);
        f.Export("e0", "disk0");
        var r = await Tools.RunAsync("nbdinfo", f.Uri("nosuch"));
        r.ExitCode.Should().NotBe(0);
        r.Stderr.Should().Contain("nosuch");
    }

    [Fact]
    public async Task Exported_node_cannot_be_deleted_until_the_export_is_removed()
    {
        await using var f = NbdFixture.Create();
        await f.AddRawNodeAsync("disk0", 1 * MiB);
        f.Export("e0", "disk0");
        var act = async () => await f.Graph.RemoveAsync("disk0");
        (await act.Should().ThrowAsync<BlockException>()).Which.Message.Should().Be("Node disk0 is in use");
        await f.Server.RemoveExportAsync("e0", hard: false);
        f.Events.DeletedExportIds.Should().Equal("e0");
        await f.Graph.RemoveAsync("disk0");
    }
}
