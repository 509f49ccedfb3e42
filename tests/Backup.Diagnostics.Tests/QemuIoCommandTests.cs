using Backup.Block;
using Backup.Diagnostics.Tests.Support;

namespace Backup.Diagnostics.Tests;

/// <summary>
/// Each command through human-monitor-command on a memory node: the bytes it leaves, what it prints
/// where (texts from qemu-io 7.2 and QEMU's monitor), and the HMP reply.
/// </summary>
public class QemuIoCommandTests
{
    [Theory]
    [InlineData("write -P 0xbb 0 512", 0, 512, 0xbb)]
    [InlineData("write -P 0xab 0x1b 0x1e", 27, 30, 0xab)]
    [InlineData("write -P 0x6e 0 512", 0, 512, 0x6e)]
    [InlineData("write -P0x49 512 512", 512, 512, 0x49)]
    [InlineData("write -qP 0x11 1k 1k", 1024, 1024, 0x11)]
    [InlineData("write -P 010 0 1", 0, 1, 8)]
    [InlineData("write -q -P 0x5e -- 0x1e 0xe", 30, 14, 0x5e)]
    [InlineData("write 4k 64k -P 0x33", 4096, 65536, 0x33)]
    [InlineData("w 0 0x1bk", 0, 27648, 0xcd)]
    [InlineData("write -P 7 0.5k 1.5k", 512, 1536, 7)]
    [InlineData("writev -P 0x21 4096 512 1k", 4096, 1536, 0x21)]
    public async Task Writes_exactly_the_bytes_the_form_names(string command, int offset, int length, int pattern)
    {
        var m = await TestMonitor.CreateAsync();
        m.Node.Data.AsSpan().Fill(0x01);
        (await m.QemuIoAsync(command)).Should().Be(command.Contains("0x1bk") ? "warning: Using a multiplier suffix on hex numbers is deprecated: 0x1bk\r\n" : "");
        m.Node.Data.AsSpan(offset, length).ToArray().Should().OnlyContain(b => b == pattern);
        m.Node.Data.AsSpan(0, offset).ContainsAnyExcept((byte)0x01).Should().BeFalse("nothing before the range changes");
        m.Node.Data.AsSpan(offset + length).ContainsAnyExcept((byte)0x01).Should().BeFalse("nothing after the range changes");
        m.Console.Stderr.Should().BeEmpty();
    }

    [Fact]
    public async Task Success_prints_qemu_io_s_report_on_stdout_and_replies_nothing()
    {
        var m = await TestMonitor.CreateAsync();
        (await m.QemuIoAsync("write -P 0xbb 0 512")).Should().Be("");
        (await m.QemuIoAsync("read -P 0xbb 0 512")).Should().Be("");
        TestMonitor.Masked(m.Console.Stdout).Should().Be(
            "wrote 512/512 bytes at offset 0\n512 bytes, 1 ops; TIME\nread 512/512 bytes at offset 0\n512 bytes, 1 ops; TIME\n");
    }

    [Theory]
    [InlineData("write -x 0 512", "", "write: invalid option -- 'x'\n", true)]
    [InlineData("write 0 512 -P", "", "write: option requires an argument -- 'P'\n", true)]
    [InlineData("write -P 0x100 0 512", "0x100 is not a valid pattern byte\n", "", false)]
    [InlineData("write -P 08 0 1", "08 is not a valid pattern byte\n", "", false)]
    [InlineData("write -P", "", "bad argument count 1 to write, expected at least 2 arguments\n", false)]
    [InlineData("write -q 0 1.5", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1.5\n", "", false)]
    [InlineData("write -q 0 8e", "Parsing error: argument too large -- 8e\n", "", false)]
    [InlineData("write -q 0 1e", "length cannot exceed 2147483136 without -n, given 1e\n", "", false)]
    [InlineData("write -q -- -1 1", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- -1\n", "", false)]
    [InlineData("write -z -P 1 0 512", "Only one of -z, -P, and -s can be specified at the same time\n", "", false)]
    [InlineData("write -u 0 512", "-u requires -z to be specified\n", "", false)]
    [InlineData("write -n 0 512", "-n requires -z to be specified\n", "", false)]
    [InlineData("write -c 1 512", "1 is not a sector-aligned value for 'offset'\n", "", false)]
    [InlineData("write -f -c 0 512", "-f and -b or -c cannot be specified at the same time\n", "", false)]
    [InlineData("write -b -z 0 512", "-b and -z cannot be specified at the same time\n", "", false)]
    [InlineData("write 1M 512", "write failed: Input/output error\n", "", false)]
    [InlineData("write -b 0 512", "write failed: Operation not supported\n", "", false)]
    [InlineData("read -s 1 0 12", "", "", true)]
    [InlineData("read -P 3 -s 11 -l 2 0 12", "pattern verification range exceeds end of read data\n", "", false)]
    [InlineData("read 0 3G", "length cannot exceed 2147483136, given 3G\n", "", false)]
    [InlineData("read 1023k 2k", "read failed: Input/output error\n", "", false)]
    [InlineData("readv 0 2G 2G", "Argument '2G' exceeds maximum size 2147483136\n", "", false)]
    [InlineData("writev 0 1G 1G", "The total number of bytes exceed the maximum size 2147483136\n", "", false)]
    [InlineData("discard 0 3G", "length cannot exceed 2147483136, given 3G\n", "", false)]
    [InlineData("nosuch 1", "", "command \"nosuch\" not found\n", false)]
    [InlineData("map x", "", "bad argument count 1 to map, expected 0 arguments\n", false)]
    [InlineData("alloc", "", "bad argument count 0 to alloc, expected between 1 and 2 arguments\n", false)]
    [InlineData("sleep x", "x is not a valid number\n", "", false)]
    [InlineData("sleep -1", "-1 is not a valid number\n", "", false)]
    [InlineData("aio_write -z 0 512 512", "-z supports only a single length parameter\n", "", false)]
    [InlineData("aio_write -i 0 512", "injecting invalid write request\n", "", false)]
    [InlineData("aio_read -i 0 512", "injecting invalid read request\n", "", false)]
    public async Task Failures_print_qemu_io_s_words_and_the_reply_stays_empty(string command, string stdout, string stderr, bool usage)
    {
        var m = await TestMonitor.CreateAsync();
        (await m.QemuIoAsync(command)).Should().Be("");
        var name = command.Split(' ')[0];
        var usageLine = name == "write"
            ? "write [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset\n"
            : "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset\n";
        m.Console.Stdout.Should().Be(stdout + (usage ? usageLine : ""));
        m.Console.Stderr.Should().Be(stderr);
        m.Node.Data.Should().OnlyContain(b => b == 0, "a refused command writes nothing");
    }

    [Fact]
    public async Task Read_verifies_a_pattern_in_a_window_and_dumps()
    {
        var m = await TestMonitor.CreateAsync();
        await m.QemuIoAsync("write -q -P 3 0 12");
        await m.QemuIoAsync("read -q -P 3 -s 1 -l 2 0 12");
        await m.QemuIoAsync("read -q -P 4 -s 1 -l 2 0 12");
        await m.QemuIoAsync("read -v 0 20");
        TestMonitor.Masked(m.Console.Stdout).Should().Be(
            "Pattern verification failed at offset 1, 2 bytes\n" +
            "00000000:  03 03 03 03 03 03 03 03 03 03 03 03 00 00 00 00  ................\n" +
            "00000010:  00 00 00 00  ....\n" +
            "read 20/20 bytes at offset 0\n20 bytes, 1 ops; TIME\n");
    }

    [Fact]
    public async Task Zero_writes_pass_unmap_fua_and_no_fallback_and_compressed_goes_its_own_way()
    {
        var m = await TestMonitor.CreateAsync();
        await m.QemuIoAsync("write -q 0 64k");
        await m.QemuIoAsync("write -q -z -u 0 4k");
        m.Node.LastWriteKind.Should().Be("zeroes");
        m.Node.LastWriteFlags.Should().Be(WriteFlags.MayUnmap);
        m.Node.Data.AsSpan(0, 4096).ToArray().Should().OnlyContain(b => b == 0);
        await m.QemuIoAsync("write -q -zn -f 4k 4k");
        m.Node.LastWriteKind.Should().Be("zeroes");
        m.Node.LastWriteFlags.Should().Be(WriteFlags.NoFallback | WriteFlags.Fua);
        await m.QemuIoAsync("write -q -f 8k 4k");
        m.Node.LastWriteKind.Should().Be("write");
        m.Node.LastWriteFlags.Should().Be(WriteFlags.Fua);
        await m.QemuIoAsync("write -q -c -P 9 64k 64k");
        m.Node.LastWriteKind.Should().Be("compressed");
        m.Node.Data.AsSpan(65536, 65536).ToArray().Should().OnlyContain(b => b == 9);
    }

    [Fact]
    public async Task Map_and_alloc_show_allocation_runs()
    {
        var m = await TestMonitor.CreateAsync();
        await m.QemuIoAsync("write -q 64k 64k");
        await m.QemuIoAsync("map");
        await m.QemuIoAsync("alloc 0 1M");
        await m.QemuIoAsync("alloc 64k 64k");
        await m.QemuIoAsync("alloc 0");
        await m.QemuIoAsync("alloc 1M");
        await m.QemuIoAsync("discard -q 64k 4k");
        await m.QemuIoAsync("alloc 0 1M");
        m.Console.Stdout.Should().Be(
            "64 KiB (0x10000) bytes not allocated at offset 0 bytes (0x0)\n" +
            "64 KiB (0x10000) bytes     allocated at offset 64 KiB (0x10000)\n" +
            "896 KiB (0xe0000) bytes not allocated at offset 128 KiB (0x20000)\n" +
            "65536/1048576 bytes allocated at offset 0 bytes\n" +
            "65536/65536 bytes allocated at offset 64 KiB\n" +
            "0/512 bytes allocated at offset 0 bytes\n" +
            "0/0 bytes allocated at offset 1 MiB\n" +
            "61440/1048576 bytes allocated at offset 0 bytes\n");
    }

    [Fact]
    public async Task Discard_reports_and_flush_reaches_the_node()
    {
        var m = await TestMonitor.CreateAsync();
        await m.QemuIoAsync("discard -C 64k 64k");
        await m.QemuIoAsync("discard 64k 64k");
        await m.QemuIoAsync("flush");
        m.Node.Flushes.Should().Be(1);
        System.Text.RegularExpressions.Regex.Replace(TestMonitor.Masked(m.Console.Stdout), @"^65536,1,[^\n]*", "CSV").Should().Be(
            "CSV\ndiscard 65536/65536 bytes at offset 65536\n64 KiB, 1 ops; TIME\n");
    }

    [Fact]
    public async Task A_read_only_node_refuses_writes_before_they_run()
    {
        var m = await TestMonitor.CreateAsync(readOnly: true);
        (await m.QemuIoAsync("write 0 512")).Should().Be("Block node is read-only\r\n");
        (await m.QemuIoAsync("discard 0 512")).Should().Be("Block node is read-only\r\n");
        (await m.QemuIoAsync("read -q 0 512")).Should().Be("");
        m.Console.Stdout.Should().BeEmpty();
    }

    [Fact]
    public async Task Monitor_level_errors_are_the_reply()
    {
        var m = await TestMonitor.CreateAsync();
        (await m.HmpAsync("qemu-io nosuch \"write 0 512\"")).Should().Be("Error: Cannot find device='' nor node-name='nosuch'\r\n");
        (await m.HmpAsync("qemu-io -d drive0 \"write 0 512\"")).Should().Be("Error: Device 'drive0' not found\r\n");
        (await m.HmpAsync("qemu-io drive0 write 0 512")).Should().Be(
            "qemu-io: extraneous characters at the end of line\r\nTry \"help qemu-io\" for more information\r\n");
        (await m.HmpAsync("qemu-io drive0 \"write 0 512")).Should().StartWith("qemu-io: string expected\r\n");
        m.Console.Stdout.Should().Be("unterminated string\n");
        m.Node.Data.Should().OnlyContain(b => b == 0);
    }

    [Fact]
    public async Task Aio_requests_run_in_the_background_and_aio_flush_waits_for_them()
    {
        var m = await TestMonitor.CreateAsync();
        (await m.QemuIoAsync("aio_write -P 0x22 0 512 512")).Should().Be("");
        (await m.QemuIoAsync("aio_write -z 4k 4k")).Should().Be("");
        (await m.QemuIoAsync("aio_flush")).Should().Be("");
        m.Aio.Count.Should().Be(0);
        m.Node.Data.AsSpan(0, 1024).ToArray().Should().OnlyContain(b => b == 0x22);
        await m.QemuIoAsync("aio_read -P 0x22 0 1k");
        await m.QemuIoAsync("aio_flush");
        TestMonitor.Masked(m.Console.Stdout).Should().Contain("wrote 1024/1024 bytes at offset 0\n1 KiB, 1 ops; TIME\n")
            .And.Contain("wrote 4096/4096 bytes at offset 4096\n").And.EndWith("read 1024/1024 bytes at offset 0\n1 KiB, 1 ops; TIME\n");
        m.Node.BusyReason.Should().BeNull("nothing holds the node once the requests are done");
    }

    [Fact]
    public async Task Breakpoints_pause_an_aio_write_until_resumed()
    {
        var m = await TestMonitor.WithBreakpointsAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await m.QemuIoAsync("break write_aio A");
        await m.QemuIoAsync("aio_write -P 0x5a 0 512");
        await m.QemuIoAsync("wait_break A", timeout.Token);
        m.Node.IsSuspended("A").Should().BeTrue();
        m.Node.Data[0].Should().Be(0, "the write is held before it reaches the data");
        m.Node.BusyReason.Should().NotBeNull("an in-flight request keeps its node");
        await m.QemuIoAsync("resume A");
        await m.QemuIoAsync("aio_flush", timeout.Token);
        m.Node.Data.AsSpan(0, 512).ToArray().Should().OnlyContain(b => b == 0x5a);
        await m.QemuIoAsync("resume A");
        await m.QemuIoAsync("remove_break A");
        await m.QemuIoAsync("break nosuch_event B");
        TestMonitor.Masked(m.Console.Stdout).Should().Be(
            "wrote 512/512 bytes at offset 0\n512 bytes, 1 ops; TIME\n" +
            "Could not resume request: No such file or directory\n" +
            "Could not remove breakpoint A: No such file or directory\n" +
            "Could not set breakpoint: No such file or directory\n");
    }

    [Fact]
    public async Task Without_blkdebug_breakpoints_are_not_supported_and_wait_break_waits_for_ever()
    {
        var m = await TestMonitor.CreateAsync();
        await m.QemuIoAsync("break write_aio A");
        await m.QemuIoAsync("remove_break A");
        await m.QemuIoAsync("resume A");
        m.Console.Stdout.Should().Be(
            "Could not set breakpoint: Operation not supported\n" +
            "Could not remove breakpoint A: Operation not supported\n" +
            "Could not resume request: Operation not supported\n");
        using var soon = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
        Func<Task> wait = () => m.QemuIoAsync("wait_break A", soon.Token);
        await wait.Should().ThrowAsync<OperationCanceledException>();
    }

    [Fact]
    public async Task Truncate_length_and_sleep()
    {
        var m = await TestMonitor.CreateAsync();
        (await m.QemuIoAsync("truncate -m x 1M")).Should().Be("Invalid preallocation mode 'x'\r\n");
        await m.QemuIoAsync("truncate x");
        await m.QemuIoAsync("length");
        var sw = System.Diagnostics.Stopwatch.StartNew();
        await m.QemuIoAsync("sleep 0x10");
        sw.ElapsedMilliseconds.Should().BeGreaterThanOrEqualTo(15);
        m.Console.Stdout.Should().Be("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- x\n1 MiB\n");
    }

    [Fact]
    public async Task Help_lists_the_commands_as_qemu_io_does()
    {
        var m = await TestMonitor.CreateAsync();
        await m.QemuIoAsync("help");
        await m.QemuIoAsync("help w");
        await m.QemuIoAsync("? nosuch");
        var lines = m.Console.Stdout.Split('\n');
        lines[0].Should().Be("aio_flush -- completes all outstanding aio requests");
        lines.Should().Contain("map  -- prints the allocated areas of a file").And.Contain("sleep -- waits for the given value in milliseconds");
        m.Console.Stdout.Should().EndWith("\nUse 'help commandname' for extended help.\n" +
            "w [-bcCfnquz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset\n" +
            "command nosuch not found\n");
    }
}
