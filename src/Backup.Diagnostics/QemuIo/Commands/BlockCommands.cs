using System.Diagnostics;
using Backup.Block;

namespace Backup.Diagnostics.QemuIo.Commands;

/// <summary>discard, flush, map, alloc, truncate, length and sleep.</summary>
internal static class BlockCommands
{
    public static IEnumerable<QemuIoCommandInfo> All =>
    [
        new("discard", "d", 2, -1, "[-Cq] off len", "discards a number of bytes at a specified offset", NeedsWrite: true, DiscardAsync),
        new("flush", "f", 0, 0, null, "flush all in-core file state to disk", NeedsWrite: false, FlushAsync),
        new("map", null, 0, 0, "", "prints the allocated areas of a file", NeedsWrite: false, MapAsync),
        new("alloc", "a", 1, 2, "offset [count]", "checks if offset is allocated in the file", NeedsWrite: false, AllocAsync),
        new("truncate", "t", 1, 3, "[-m prealloc_mode] off", "truncates the current file at the given offset", NeedsWrite: true, TruncateAsync),
        new("length", "l", 0, 0, null, "gets the length of the current file", NeedsWrite: false, Length),
        new("sleep", null, 1, 1, null, "waits for the given value in milliseconds", NeedsWrite: false, SleepAsync),
    ];

    private static async ValueTask DiscardAsync(QemuIoInvocation io)
    {
        bool machine = false, quiet = false;
        var parsed = io.GetOpt("Cq");
        foreach (var (letter, _) in parsed.Options)
        {
            machine |= letter == 'C';
            quiet |= letter == 'q';
        }
        if (!io.FinishOptions(parsed))
        {
            return;
        }
        if (parsed.Operands.Count != 2)
        {
            io.PrintUsage();
            return;
        }
        if (!io.TryParseSize(parsed.Operands[0], out var offset) || !io.TryParseSize(parsed.Operands[1], out var bytes))
        {
            return;
        }
        if (bytes > IoLimits.MaxRequestBytes)
        {
            io.Print($"length cannot exceed {IoLimits.MaxRequestBytes}, given {parsed.Operands[1]}\n");
            return;
        }
        var start = Stopwatch.GetTimestamp();
        try
        {
            BackendRange.Check(io.Node, offset, bytes);
            await io.Node.DiscardAsync(offset, bytes, io.CancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
        {
            io.Print($"discard failed: {Errno.Describe(e)}\n");
            return;
        }
        if (!quiet)
        {
            io.Print(QemuIoFormat.Report("discard", Stopwatch.GetElapsedTime(start), offset, bytes, bytes, 1, machine));
        }
    }

    private static async ValueTask FlushAsync(QemuIoInvocation io)
    {
        try
        {
            await io.Node.FlushAsync(io.CancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
        {
            // qemu-io 7.2 returns blk_flush's error without printing it.
        }
    }

    /// <summary>map: runs of equal allocation (QEMU's bdrv_is_allocated: this node decides what the range reads as).</summary>
    private static async ValueTask MapAsync(QemuIoInvocation io)
    {
        long offset = 0;
        var bytes = io.Node.Length;
        while (bytes > 0)
        {
            BlockStatus first;
            long run;
            try
            {
                first = await io.Node.GetBlockStatusAsync(offset, Math.Min(bytes, IoLimits.MaxRequestBytes), io.CancellationToken).ConfigureAwait(false);
                run = first.Length;
                while (run > 0 && run < bytes)
                {
                    var next = await io.Node.GetBlockStatusAsync(offset + run, Math.Min(bytes - run, IoLimits.MaxRequestBytes), io.CancellationToken).ConfigureAwait(false);
                    if (next.IsAllocated != first.IsAllocated || next.Length == 0)
                    {
                        break;
                    }
                    run += next.Length;
                }
            }
            catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
            {
                io.Monitor($"Failed to get allocation status: {Errno.Describe(e)}");
                return;
            }
            if (run == 0)
            {
                io.Monitor("Unexpected end of image");
                return;
            }
            io.Print($"{QemuIoFormat.Size(run)} (0x{run:x}) bytes {(first.IsAllocated ? "    allocated" : "not allocated")} at offset {QemuIoFormat.Size(offset)} (0x{offset:x})\n");
            offset += run;
            bytes -= run;
        }
    }

    private static async ValueTask AllocAsync(QemuIoInvocation io)
    {
        if (!io.TryParseSize(io.Argv[1], out var offset))
        {
            return;
        }
        var count = 512L;
        if (io.Argv.Count == 3 && !io.TryParseSize(io.Argv[2], out count))
        {
            return;
        }
        var start = offset;
        var remaining = count;
        long allocated = 0;
        while (remaining > 0)
        {
            BlockStatus s;
            try
            {
                s = offset >= io.Node.Length
                    ? default
                    : await io.Node.GetBlockStatusAsync(offset, remaining, io.CancellationToken).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
            {
                io.Print($"is_allocated failed: {Errno.Describe(e)}\n");
                return;
            }
            offset += s.Length;
            remaining -= s.Length;
            if (s.IsAllocated)
            {
                allocated += s.Length;
            }
            if (s.Length == 0)
            {
                // Past the end: the count shrinks to what the image has.
                count -= remaining;
                remaining = 0;
            }
        }
        io.Print($"{allocated}/{count} bytes allocated at offset {QemuIoFormat.Size(start)}\n");
    }

    private static async ValueTask TruncateAsync(QemuIoInvocation io)
    {
        var parsed = io.GetOpt("m:");
        foreach (var (_, mode) in parsed.Options)
        {
            if (mode is "metadata" or "falloc" or "full")
            {
                // QEMU's preallocation modes exist, but backupd's resize only grows sparsely (mode 'off').
                io.Monitor($"Unsupported preallocation mode '{mode}'");
                return;
            }
            if (mode != "off")
            {
                io.Monitor($"Invalid preallocation mode '{mode}'");
                return;
            }
        }
        if (!io.FinishOptions(parsed))
        {
            return;
        }
        if (parsed.Operands.Count == 0)
        {
            io.PrintUsage();
            return;
        }
        // qemu-io 7.2 takes the first operand and ignores any more.
        if (!io.TryParseSize(parsed.Operands[0], out var length))
        {
            return;
        }
        try
        {
            await io.Node.TruncateAsync(length, io.CancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
        {
            io.Monitor(e is BlockException ? e.Message : $"Could not resize: {Errno.Describe(e)}");
        }
    }

    private static ValueTask Length(QemuIoInvocation io)
    {
        io.Print(QemuIoFormat.Size(io.Node.Length) + "\n");
        return ValueTask.CompletedTask;
    }

    private static async ValueTask SleepAsync(QemuIoInvocation io)
    {
        if (!QemuNumbers.TryParseLong(io.Argv[1], out var ms) || ms < 0)
        {
            io.Print($"{io.Argv[1]} is not a valid number\n");
            return;
        }
        await Task.Delay(TimeSpan.FromMilliseconds(ms), io.CancellationToken).ConfigureAwait(false);
    }
}
