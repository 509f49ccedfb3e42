using System.Diagnostics;
using Backup.Block;

namespace Backup.Diagnostics.QemuIo.Commands;

/// <summary>
/// aio_read, aio_write, aio_flush: the request starts and the command returns; its report is printed when
/// it completes, and aio_flush waits for every running request. While in flight a request keeps the node
/// from being deleted.
/// </summary>
internal static class AioCommands
{
    public static IEnumerable<QemuIoCommandInfo> All =>
    [
        new("aio_read", null, 2, -1, "[-Ciqv] [-P pattern] off len [len..]",
            "asynchronously reads a number of bytes", NeedsWrite: false, AioReadAsync),
        new("aio_write", null, 2, -1, "[-Cfiquz] [-P pattern] off len [len..]",
            "asynchronously writes a number of bytes", NeedsWrite: true, AioWriteAsync),
        new("aio_flush", null, 0, 0, null, "completes all outstanding aio requests", NeedsWrite: false,
            io => new ValueTask(io.Aio.DrainAsync(io.CancellationToken))),
    ];

    private const string InFlightReason = "node is used by a qemu-io request";

    private static ValueTask AioReadAsync(QemuIoInvocation io)
    {
        bool machine = false, quiet = false, verbose = false, hasPattern = false;
        byte pattern = 0;
        var parsed = io.GetOpt("CP:iqv");
        foreach (var (letter, arg) in parsed.Options)
        {
            switch (letter)
            {
                case 'C': machine = true; break;
                case 'P':
                    hasPattern = true;
                    if (!io.TryParsePattern(arg!, out pattern))
                    {
                        return ValueTask.CompletedTask;
                    }
                    break;
                case 'i':
                    // QEMU counts an invalid request in the node's statistics; backupd keeps none.
                    io.Print("injecting invalid read request\n");
                    return ValueTask.CompletedTask;
                case 'q': quiet = true; break;
                case 'v': verbose = true; break;
            }
        }
        if (!io.FinishOptions(parsed))
        {
            return ValueTask.CompletedTask;
        }
        if (parsed.Operands.Count < 2)
        {
            io.PrintUsage();
            return ValueTask.CompletedTask;
        }
        if (!io.TryParseSize(parsed.Operands[0], out var offset) || !IoLimits.TryParseVector(io, parsed.Operands.Skip(1), out var size))
        {
            return ValueTask.CompletedTask;
        }
        var node = io.Node;
        var user = node.AddUser(InFlightReason);
        io.Aio.Start(async () =>
        {
            using var _ = user;
            using var buffer = IoLimits.Rent(size, 0xab);
            var start = Stopwatch.GetTimestamp();
            try
            {
                BackendRange.Check(node, offset, size);
                await node.ReadAsync(offset, buffer.Memory).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
            {
                io.Print($"readv failed: {Errno.Describe(e)}\n");
                return;
            }
            ReadCommands.ReportRead(io, buffer.Span, offset, Stopwatch.GetElapsedTime(start), hasPattern, pattern, quiet, verbose, machine);
        });
        return ValueTask.CompletedTask;
    }

    private static ValueTask AioWriteAsync(QemuIoInvocation io)
    {
        bool machine = false, quiet = false, zero = false;
        var flags = WriteFlags.None;
        var pattern = WriteCommands.DefaultPattern;
        var parsed = io.GetOpt("CfiqP:uz");
        foreach (var (letter, arg) in parsed.Options)
        {
            switch (letter)
            {
                case 'C': machine = true; break;
                case 'f': flags |= WriteFlags.Fua; break;
                case 'q': quiet = true; break;
                case 'u': flags |= WriteFlags.MayUnmap; break;
                case 'P':
                    // qemu-io 7.2 does not remember -P here, so "-z -P" is not refused: zeroes are written.
                    if (!io.TryParsePattern(arg!, out pattern))
                    {
                        return ValueTask.CompletedTask;
                    }
                    break;
                case 'i':
                    io.Print("injecting invalid write request\n");
                    return ValueTask.CompletedTask;
                case 'z': zero = true; break;
            }
        }
        if (!io.FinishOptions(parsed))
        {
            return ValueTask.CompletedTask;
        }
        if (parsed.Operands.Count < 2)
        {
            io.PrintUsage();
            return ValueTask.CompletedTask;
        }
        if (zero && parsed.Operands.Count != 2)
        {
            io.Print("-z supports only a single length parameter\n");
            return ValueTask.CompletedTask;
        }
        if ((flags & WriteFlags.MayUnmap) != 0 && !zero)
        {
            io.Print("-u requires -z to be specified\n");
            return ValueTask.CompletedTask;
        }
        if (!io.TryParseSize(parsed.Operands[0], out var offset))
        {
            return ValueTask.CompletedTask;
        }
        long size;
        if (zero)
        {
            if (!io.TryParseSize(parsed.Operands[1], out size))
            {
                return ValueTask.CompletedTask;
            }
        }
        else if (!IoLimits.TryParseVector(io, parsed.Operands.Skip(1), out size))
        {
            return ValueTask.CompletedTask;
        }
        var node = io.Node;
        var user = node.AddUser(InFlightReason);
        io.Aio.Start(async () =>
        {
            using var _ = user;
            using var buffer = IoLimits.Rent(zero ? 0 : size, pattern);
            var start = Stopwatch.GetTimestamp();
            try
            {
                BackendRange.Check(node, offset, size);
                if (zero)
                {
                    await node.WriteZeroesAsync(offset, size, flags).ConfigureAwait(false);
                }
                else
                {
                    await node.WriteAsync(offset, buffer.Memory, flags).ConfigureAwait(false);
                }
            }
            catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
            {
                io.Print($"aio_write failed: {Errno.Describe(e)}\n");
                return;
            }
            if (!quiet)
            {
                // qemu-io 7.2 never starts the clock for -z, so its report counts from the monotonic clock's zero (boot).
                var elapsed = zero ? TimeSpan.FromMilliseconds(Environment.TickCount64) : Stopwatch.GetElapsedTime(start);
                io.Print(QemuIoFormat.Report("wrote", elapsed, offset, size, size, 1, machine));
            }
        });
        return ValueTask.CompletedTask;
    }
}
