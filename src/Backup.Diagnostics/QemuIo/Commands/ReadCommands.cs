using System.Diagnostics;

namespace Backup.Diagnostics.QemuIo.Commands;

/// <summary>read and readv: read through the node's I/O path, optionally check a pattern and dump the bytes.</summary>
internal static class ReadCommands
{
    /// <summary>qemu-io fills read buffers with 0xab before reading.</summary>
    private const byte ReadFill = 0xab;

    public static IEnumerable<QemuIoCommandInfo> All =>
    [
        new("read", "r", 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
            "reads a number of bytes at a specified offset", NeedsWrite: false, ReadAsync),
        new("readv", null, 2, -1, "[-Cqv] [-P pattern] off len [len..]",
            "reads a number of bytes at a specified offset", NeedsWrite: false, ReadvAsync),
    ];

    private static async ValueTask ReadAsync(QemuIoInvocation io)
    {
        bool machine = false, quiet = false, verbose = false, hasPattern = false, hasStart = false, hasLength = false, vmstate = false;
        byte pattern = 0;
        long patternOffset = 0, patternCount = 0;
        var parsed = io.GetOpt("bCl:pP:qs:v");
        foreach (var (letter, arg) in parsed.Options)
        {
            switch (letter)
            {
                case 'b': vmstate = true; break;
                case 'C': machine = true; break;
                case 'l':
                    hasLength = true;
                    if (!io.TryParseSize(arg!, out patternCount))
                    {
                        return;
                    }
                    break;
                case 'p': break; // ignored for backwards compatibility
                case 'P':
                    hasPattern = true;
                    if (!io.TryParsePattern(arg!, out pattern))
                    {
                        return;
                    }
                    break;
                case 'q': quiet = true; break;
                case 's':
                    hasStart = true;
                    if (!io.TryParseSize(arg!, out patternOffset))
                    {
                        return;
                    }
                    break;
                case 'v': verbose = true; break;
            }
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
        if (!io.TryParseSize(parsed.Operands[0], out var offset) || !io.TryParseSize(parsed.Operands[1], out var count))
        {
            return;
        }
        if (count > IoLimits.MaxRequestBytes)
        {
            io.Print($"length cannot exceed {IoLimits.MaxRequestBytes}, given {parsed.Operands[1]}\n");
            return;
        }
        if (!hasPattern && (hasLength || hasStart))
        {
            io.PrintUsage();
            return;
        }
        if (!hasLength)
        {
            patternCount = count - patternOffset;
        }
        if (patternCount < 0 || patternCount + patternOffset > count)
        {
            io.Print("pattern verification range exceeds end of read data\n");
            return;
        }
        if (vmstate && !SectorAligned(io, offset, count))
        {
            return;
        }
        using var buffer = IoLimits.Rent(count, ReadFill);
        var start = Stopwatch.GetTimestamp();
        try
        {
            if (vmstate)
            {
                // backupd keeps no VM state in its images (QEMU: bdrv_load_vmstate on a driver without it).
                throw new NotSupportedException();
            }
            BackendRange.Check(io.Node, offset, count);
            await io.Node.ReadAsync(offset, buffer.Memory, io.CancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or NotSupportedException or Block.BlockException)
        {
            io.Print($"read failed: {Errno.Describe(e)}\n");
            return;
        }
        var elapsed = Stopwatch.GetElapsedTime(start);
        if (hasPattern && buffer.Span.Slice((int)patternOffset, (int)patternCount).ContainsAnyExcept(pattern))
        {
            io.Print($"Pattern verification failed at offset {offset + patternOffset}, {patternCount} bytes\n");
        }
        if (quiet)
        {
            return;
        }
        if (verbose)
        {
            io.Print(QemuIoFormat.Dump(buffer.Span, offset));
        }
        io.Print(QemuIoFormat.Report("read", elapsed, offset, count, count, 1, machine));
    }

    private static async ValueTask ReadvAsync(QemuIoInvocation io)
    {
        bool machine = false, quiet = false, verbose = false, hasPattern = false;
        byte pattern = 0;
        var parsed = io.GetOpt("CP:qv");
        foreach (var (letter, arg) in parsed.Options)
        {
            switch (letter)
            {
                case 'C': machine = true; break;
                case 'P':
                    hasPattern = true;
                    if (!io.TryParsePattern(arg!, out pattern))
                    {
                        return;
                    }
                    break;
                case 'q': quiet = true; break;
                case 'v': verbose = true; break;
            }
        }
        if (!io.FinishOptions(parsed))
        {
            return;
        }
        if (parsed.Operands.Count < 2)
        {
            io.PrintUsage();
            return;
        }
        if (!io.TryParseSize(parsed.Operands[0], out var offset) || !IoLimits.TryParseVector(io, parsed.Operands.Skip(1), out var size))
        {
            return;
        }
        using var buffer = IoLimits.Rent(size, ReadFill);
        var start = Stopwatch.GetTimestamp();
        try
        {
            BackendRange.Check(io.Node, offset, size);
            await io.Node.ReadAsync(offset, buffer.Memory, io.CancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or NotSupportedException or Block.BlockException)
        {
            io.Print($"readv failed: {Errno.Describe(e)}\n");
            return;
        }
        var elapsed = Stopwatch.GetElapsedTime(start);
        ReportRead(io, buffer.Span, offset, elapsed, hasPattern, pattern, quiet, verbose, machine);
    }

    /// <summary>The end of readv and aio_read: the whole buffer against the pattern, then dump and report.</summary>
    internal static void ReportRead(QemuIoInvocation io, ReadOnlySpan<byte> data, long offset, TimeSpan elapsed,
        bool hasPattern, byte pattern, bool quiet, bool verbose, bool machine)
    {
        if (hasPattern && data.ContainsAnyExcept(pattern))
        {
            io.Print($"Pattern verification failed at offset {offset}, {data.Length} bytes\n");
        }
        if (quiet)
        {
            return;
        }
        if (verbose)
        {
            io.Print(QemuIoFormat.Dump(data, offset));
        }
        io.Print(QemuIoFormat.Report("read", elapsed, offset, data.Length, data.Length, 1, machine));
    }

    /// <summary>-b (and write -c) need whole sectors.</summary>
    internal static bool SectorAligned(QemuIoInvocation io, long offset, long count)
    {
        if (offset % 512 != 0)
        {
            io.Print($"{offset} is not a sector-aligned value for 'offset'\n");
            return false;
        }
        if (count % 512 != 0)
        {
            io.Print($"{count} is not a sector-aligned value for 'count'\n");
            return false;
        }
        return true;
    }
}
