using Backup.Block.Drivers.Blkdebug;

namespace Backup.Block.Tests.Blkdebug;

/// <summary>
/// blkdebug nodes in a graph: events raised by the drivers above and the generic path, request limits
/// (what reaches the image), and breakpoints through <see cref="IDebugBreakpoints"/>.
/// </summary>
public sealed class BlkdebugNodeTests : IAsyncLifetime
{
    private const int Size = 1 << 20;
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("blkdebug-node");
    private readonly BlockGraph _graph = BlockGraph.CreateDefault();

    private string Image => Path.Combine(_dir.FullName, "d.img");

    public Task InitializeAsync()
    {
        // A recognisable pattern everywhere, so untouched bytes can be told from written ones.
        File.WriteAllBytes(Image, Enumerable.Repeat((byte)0xee, Size).ToArray());
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await _graph.CloseAllAsync();
        _dir.Delete(recursive: true);
    }

    private static List<object?> List(params object?[] items) => [.. items];

    private static BlockOptions Rule(string ev, params (string Key, object Value)[] more)
    {
        var o = new BlockOptions { ["event"] = ev };
        foreach (var (k, v) in more)
        {
            o[k] = v;
        }
        return o;
    }

    /// <summary>raw (node "top") over blkdebug (node "dbg") over the image file.</summary>
    private async Task<(BlockNode Top, BlkdebugNode Debug)> OpenAsync(BlockOptions blkdebug)
    {
        blkdebug["driver"] = "blkdebug";
        blkdebug["node-name"] = "dbg";
        blkdebug["image"] = new BlockOptions { ["driver"] = "file", ["filename"] = Image };
        var debug = (BlkdebugNode)await _graph.AddAsync(blkdebug);
        var top = await _graph.AddAsync(new BlockOptions { ["driver"] = "raw", ["node-name"] = "top", ["file"] = "dbg" });
        return (top, debug);
    }

    private static async Task<IOException> FailsAsync(Func<Task> io) =>
        (await FluentActions.Awaiting(io).Should().ThrowAsync<IOException>()).Which;

    private byte[] OnDisk(long offset, int length) => File.ReadAllBytes(Image).AsSpan((int)offset, length).ToArray();

    [Fact]
    public async Task The_none_event_fires_at_open_and_raw_raises_read_aio_and_write_aio_on_its_file()
    {
        // qemu-io: with inject-error none once, the first read fails and the second works.
        var (top, _) = await OpenAsync(new BlockOptions { ["inject-error"] = List(Rule("none", ("once", true))) });
        (await FailsAsync(() => top.ReadAsync(0, new byte[512]).AsTask())).Message.Should().Be("Input/output error");
        await top.ReadAsync(0, new byte[512]);

        await _graph.CloseAllAsync();
        var (top2, _) = await OpenAsync(new BlockOptions
        {
            ["inject-error"] = List(Rule("write_aio", ("errno", 28L), ("iotype", "write"))),
        });
        await top2.ReadAsync(0, new byte[512]);
        (await FailsAsync(() => top2.WriteAsync(0, new byte[512]).AsTask())).Message.Should().Be("No space left on device");
    }

    [Fact]
    public async Task A_flush_moves_the_state_only_after_a_write_as_QEMU_skips_flushes_with_nothing_written()
    {
        var (top, debug) = await OpenAsync(new BlockOptions
        {
            ["set-state"] = List(Rule("flush_to_disk", ("state", 1L), ("new_state", 2L))),
            ["inject-error"] = List(Rule("read_aio", ("state", 2L), ("once", true))),
        });
        await top.FlushAsync();
        debug.State.Should().Be(1);
        await top.ReadAsync(0, new byte[512]);
        await top.WriteAsync(0, new byte[] { 1 });
        await top.FlushAsync();
        debug.State.Should().Be(2);
        await FailsAsync(() => top.ReadAsync(0, new byte[512]).AsTask());
        await top.ReadAsync(0, new byte[512]);
    }

    [Fact]
    public async Task The_generic_path_raises_pwritev_on_the_node_written_and_pwritev_done_after_it()
    {
        var (top, debug) = await OpenAsync(new BlockOptions
        {
            ["set-state"] = List(Rule("pwritev", ("state", 1L), ("new_state", 2L)), Rule("pwritev_done", ("state", 2L), ("new_state", 3L))),
        });
        await top.WriteAsync(0, new byte[] { 1 });
        debug.State.Should().Be(3);
        var direct = await OpenDirectAsync(new BlockOptions { ["inject-error"] = List(Rule("pwritev_zero", ("once", true), ("iotype", "write"))) });
        await direct.WriteZeroesAsync(0, 4096);
        await FailsAsync(() => direct.WriteAsync(0, new byte[512]).AsTask());
    }

    private async Task<BlockNode> OpenDirectAsync(BlockOptions blkdebug)
    {
        var path = Path.Combine(_dir.FullName, "direct.img");
        File.WriteAllBytes(path, new byte[65536]);
        blkdebug["driver"] = "blkdebug";
        blkdebug["node-name"] = "direct";
        blkdebug["image"] = new BlockOptions { ["driver"] = "file", ["filename"] = path };
        return await _graph.AddAsync(blkdebug);
    }

    [Fact]
    public async Task Max_transfer_splits_requests_so_a_sector_rule_fails_only_the_piece_that_covers_it()
    {
        // 16 KiB in 4 KiB pieces; sector 9 (byte 4608) is in the second: the first reaches the disk, the rest not.
        var (top, _) = await OpenAsync(new BlockOptions
        {
            ["max-transfer"] = 4096L,
            ["inject-error"] = List(Rule("write_aio", ("sector", 9L), ("iotype", "write"), ("once", true))),
        });
        var data = Enumerable.Repeat((byte)0x5a, 16384).ToArray();
        await FailsAsync(() => top.WriteAsync(0, data).AsTask());
        OnDisk(0, 4096).Should().OnlyContain(b => b == 0x5a);
        OnDisk(4096, 12288).Should().OnlyContain(b => b == 0xee);
        await top.WriteAsync(0, data);
        OnDisk(0, 16384).Should().OnlyContain(b => b == 0x5a);
    }

    [Fact]
    public async Task Unaligned_writes_are_read_modify_writes_whose_reads_are_checked_as_reads()
    {
        var (top, debug) = await OpenAsync(new BlockOptions
        {
            ["align"] = 4096L,
            ["set-state"] = List(Rule("pwritev_rmw_after_tail", ("state", 1L), ("new_state", 5L))),
            ["inject-error"] = List(Rule("none", ("iotype", "read"), ("once", true))),
        });
        // The head read fails (QEMU checks the padding read like any read), nothing is written.
        await FailsAsync(() => top.WriteAsync(10, new byte[] { 1, 2, 3 }).AsTask());
        OnDisk(0, 4096).Should().OnlyContain(b => b == 0xee);
        // Across a block boundary: head and tail blocks read and patched; bytes around stay.
        var data = Enumerable.Repeat((byte)0x11, 5000).ToArray();
        await top.WriteAsync(100, data);
        debug.State.Should().Be(5);
        OnDisk(0, 100).Should().OnlyContain(b => b == 0xee);
        OnDisk(100, 5000).Should().OnlyContain(b => b == 0x11);
        OnDisk(5100, 8192 - 5100).Should().OnlyContain(b => b == 0xee);
        var back = new byte[7];
        await top.ReadAsync(97, back);
        back.Should().Equal(0xee, 0xee, 0xee, 0x11, 0x11, 0x11, 0x11);
    }

    [Fact]
    public async Task Write_zeroes_is_cut_at_opt_and_max_write_zero_and_small_pieces_become_writes()
    {
        // 100 KiB of zeroes from 0 with opt 64 KiB: [0,64K) write-zeroes, [64K,100K) written as zeros.
        var (top, _) = await OpenAsync(new BlockOptions
        {
            ["opt-write-zero"] = 65536L,
            ["inject-error"] = List(Rule("none", ("iotype", "write-zeroes"), ("sector", 150L))),
        });
        await top.WriteZeroesAsync(0, 102400);
        OnDisk(0, 102400).Should().OnlyContain(b => b == 0);

        await _graph.CloseAllAsync();
        File.WriteAllBytes(Image, Enumerable.Repeat((byte)0xee, Size).ToArray());
        var (top2, _) = await OpenAsync(new BlockOptions
        {
            ["opt-write-zero"] = 65536L,
            ["inject-error"] = List(Rule("none", ("iotype", "write"), ("sector", 150L), ("once", true))),
        });
        await FailsAsync(() => top2.WriteZeroesAsync(0, 102400).AsTask());
        OnDisk(0, 65536).Should().OnlyContain(b => b == 0, "the first piece was a write-zeroes and went through");

        await _graph.CloseAllAsync();
        File.WriteAllBytes(Image, Enumerable.Repeat((byte)0xee, Size).ToArray());
        var (top3, _) = await OpenAsync(new BlockOptions
        {
            ["max-write-zero"] = 65536L,
            ["inject-error"] = List(Rule("none", ("iotype", "write-zeroes"), ("sector", 300L), ("once", true))),
        });
        await FailsAsync(() => top3.WriteZeroesAsync(0, 262144).AsTask());
        OnDisk(0, 131072).Should().OnlyContain(b => b == 0);
        OnDisk(131072, 131072).Should().OnlyContain(b => b == 0xee, "pieces from the failing one on never ran");
    }

    [Fact]
    public async Task A_config_file_drives_the_node_and_a_missing_one_fails_the_open_as_in_QSD()
    {
        var config = Path.Combine(_dir.FullName, "blkdebug.conf");
        await File.WriteAllTextAsync(config, "[set-state]\nevent = \"write_aio\"\nstate = \"1\"\nnew_state = \"2\"\n\n"
            + "[inject-error]\nevent = \"read_aio\"\nstate = \"2\"\nerrno = \"28\"\n");
        var (top, debug) = await OpenAsync(new BlockOptions { ["config"] = config });
        debug.Filename.Should().Be($"blkdebug:{config}:{Image}");
        await top.ReadAsync(0, new byte[512]);
        await top.WriteAsync(0, new byte[] { 1 });
        (await FailsAsync(() => top.ReadAsync(0, new byte[512]).AsTask())).Message.Should().Be("No space left on device");

        var missing = new BlockOptions
        {
            ["driver"] = "blkdebug", ["node-name"] = "m", ["config"] = Path.Combine(_dir.FullName, "nope.conf"),
            ["image"] = new BlockOptions { ["driver"] = "file", ["filename"] = Image },
        };
        (await FluentActions.Awaiting(() => _graph.AddAsync(missing).AsTask()).Should().ThrowAsync<BlockException>())
            .Which.Message.Should().Be("Could not read blkdebug config file: No such file or directory");
    }

    [Fact]
    public async Task Immediately_and_deferred_failures_both_fail_the_request_with_the_rules_errno()
    {
        var (top, _) = await OpenAsync(new BlockOptions
        {
            ["inject-error"] = List(Rule("read_aio", ("immediately", true), ("errno", 28L), ("once", true))),
        });
        (await FailsAsync(() => top.ReadAsync(0, new byte[512]).AsTask())).HResult.Should().Be(28);
        await top.ReadAsync(0, new byte[512]);
    }

    [Fact]
    public async Task A_breakpoint_found_from_the_top_node_holds_a_write_until_resumed()
    {
        var (top, debug) = await OpenAsync(new BlockOptions());
        var bp = top.FindDebugBreakpoints();
        bp.Should().BeSameAs(debug);
        bp!.SetBreakpoint(BlkdebugEvent.WriteAio, "A");
        var write = top.WriteAsync(0, new byte[] { 7 }).AsTask();
        await Task.Delay(50);
        write.IsCompleted.Should().BeFalse();
        bp.IsSuspended("A").Should().BeTrue();
        OnDisk(0, 1).Should().Equal(0xee);
        bp.Resume("A").Should().BeTrue();
        await write.WaitAsync(TimeSpan.FromSeconds(10));
        OnDisk(0, 1).Should().Equal(7);
        bp.IsSuspended("A").Should().BeFalse();
    }

    [Fact]
    public async Task Qcow2_raises_its_metadata_events_on_its_file()
    {
        var path = Path.Combine(_dir.FullName, "q.qcow2");
        var create = System.Diagnostics.Process.Start("qemu-img", ["create", "-q", "-f", "qcow2", path, "4M"])!;
        await create.WaitForExitAsync();
        create.ExitCode.Should().Be(0);
        // The first write allocates: write_aio, then l2_update moves to state 2; the next data write fails once.
        var debug = (BlkdebugNode)await _graph.AddAsync(new BlockOptions
        {
            ["driver"] = "blkdebug", ["node-name"] = "qd",
            ["image"] = new BlockOptions { ["driver"] = "file", ["filename"] = path },
            ["set-state"] = List(Rule("l2_update", ("state", 1L), ("new_state", 2L))),
            ["inject-error"] = List(Rule("write_aio", ("state", 2L), ("once", true))),
        });
        var q = await _graph.AddAsync(new BlockOptions { ["driver"] = "qcow2", ["node-name"] = "q", ["file"] = "qd" });
        await q.WriteAsync(0, Enumerable.Repeat((byte)1, 65536).ToArray());
        debug.State.Should().Be(2);
        await FailsAsync(() => q.WriteAsync(0, Enumerable.Repeat((byte)2, 65536).ToArray()).AsTask());
        await q.WriteAsync(0, Enumerable.Repeat((byte)3, 65536).ToArray());
        var back = new byte[4];
        await q.ReadAsync(0, back);
        back.Should().Equal(3, 3, 3, 3);
    }
}
