using System.Diagnostics;
using Backup.Block;

namespace Backup.Diagnostics.QemuIo.Commands;

/// <summary>write and writev: guest writes through the node's one I/O path (bitmaps and observers see them).</summary>
internal static class WriteCommands
{
    /// <summary>qemu-io's default write pattern.</summary>
    public const byte DefaultPattern = 0xcd;

    public static IEnumerable<QemuIoCommandInfo> All =>
    [
        new("write", "w", 2, -1, "[-bcCfnquz] [-P pattern | -s source_file] off len",
            "writes a number of bytes at a specified offset", NeedsWrite: true, WriteAsync),
        new("writev", null, 2, -1, "[-Cfq] [-P pattern] off len [len..]",
            "writes a number of bytes at a specified offset", NeedsWrite: true, WritevAsync),
    ];

    private static async ValueTask WriteAsync(QemuIoInvocation io)
    {
        bool vmstate = false, compressed = false, machine = false, fua = false, noFallback = false;
        bool hasPattern = false, quiet = false, hasSource = false, unmap = false, zero = false;
        var pattern = DefaultPattern;
        string? sourceFile = null;
        var parsed = io.GetOpt("bcCfnpP:qs:uz");
        foreach (var (letter, arg) in parsed.Options)
        {
            switch (letter)
            {
                case 'b': vmstate = true; break;
                case 'c': compressed = true; break;
                case 'C': machine = true; break;
                case 'f': fua = true; break;
                case 'n': noFallback = true; break;
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
                    hasSource = true;
                    sourceFile = arg;
                    break;
                case 'u': unmap = true; break;
                case 'z': zero = true; break;
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
        string? conflict =
            vmstate && zero ? "-b and -z cannot be specified at the same time"
            : fua && (vmstate || compressed) ? "-f and -b or -c cannot be specified at the same time"
            : noFallback && !zero ? "-n requires -z to be specified"
            : unmap && !zero ? "-u requires -z to be specified"
            : (zero ? 1 : 0) + (hasPattern ? 1 : 0) + (hasSource ? 1 : 0) > 1 ? "Only one of -z, -P, and -s can be specified at the same time"
            : null;
        if (conflict is not null)
        {
            io.Print(conflict + "\n");
            return;
        }
        if (!io.TryParseSize(parsed.Operands[0], out var offset) || !io.TryParseSize(parsed.Operands[1], out var count))
        {
            return;
        }
        if (count > IoLimits.MaxRequestBytes && !noFallback)
        {
            io.Print($"length cannot exceed {IoLimits.MaxRequestBytes} without -n, given {parsed.Operands[1]}\n");
            return;
        }
        if ((vmstate || compressed) && !ReadCommands.SectorAligned(io, offset, count))
        {
            return;
        }
        var flags = (fua ? WriteFlags.Fua : WriteFlags.None) | (unmap ? WriteFlags.MayUnmap : WriteFlags.None)
            | (noFallback ? WriteFlags.NoFallback : WriteFlags.None);
        PooledBuffer? buffer = null;
        if (!zero)
        {
            buffer = IoLimits.Rent(count, pattern);
            if (sourceFile is not null && !await FillFromFileAsync(io, sourceFile, buffer.Value.Memory).ConfigureAwait(false))
            {
                buffer.Value.Dispose();
                return;
            }
        }
        try
        {
            var start = Stopwatch.GetTimestamp();
            try
            {
                if (vmstate)
                {
                    // backupd keeps no VM state in its images (QEMU: bdrv_save_vmstate on a driver without it).
                    throw new NotSupportedException();
                }
                BackendRange.Check(io.Node, offset, count);
                if (zero)
                {
                    await io.Node.WriteZeroesAsync(offset, count, flags, io.CancellationToken).ConfigureAwait(false);
                }
                else if (compressed)
                {
                    if (!io.Node.SupportsCompressedWrites)
                    {
                        throw new NotSupportedException();
                    }
                    await io.Node.WriteCompressedAsync(offset, buffer!.Value.Memory, io.CancellationToken).ConfigureAwait(false);
                }
                else
                {
                    await io.Node.WriteAsync(offset, buffer!.Value.Memory, flags, io.CancellationToken).ConfigureAwait(false);
                }
            }
            catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
            {
                io.Print($"write failed: {Errno.Describe(e)}\n");
                return;
            }
            if (!quiet)
            {
                io.Print(QemuIoFormat.Report("wrote", Stopwatch.GetElapsedTime(start), offset, count, count, 1, machine));
            }
        }
        finally
        {
            buffer?.Dispose();
        }
    }

    private static async ValueTask WritevAsync(QemuIoInvocation io)
    {
        bool machine = false, quiet = false, fua = false;
        var pattern = DefaultPattern;
        var parsed = io.GetOpt("CfqP:");
        foreach (var (letter, arg) in parsed.Options)
        {
            switch (letter)
            {
                case 'C': machine = true; break;
                case 'f': fua = true; break;
                case 'q': quiet = true; break;
                case 'P':
                    if (!io.TryParsePattern(arg!, out pattern))
                    {
                        return;
                    }
                    break;
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
        using var buffer = IoLimits.Rent(size, pattern);
        var start = Stopwatch.GetTimestamp();
        try
        {
            BackendRange.Check(io.Node, offset, size);
            await io.Node.WriteAsync(offset, buffer.Memory, fua ? WriteFlags.Fua : WriteFlags.None, io.CancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or NotSupportedException or BlockException)
        {
            io.Print($"writev failed: {Errno.Describe(e)}\n");
            return;
        }
        if (!quiet)
        {
            io.Print(QemuIoFormat.Report("wrote", Stopwatch.GetElapsedTime(start), offset, size, size, 1, machine));
        }
    }

    /// <summary>-s: the buffer is the file's bytes, repeated to the length (qemu_io_alloc_from_file); errors as perror.</summary>
    private static async ValueTask<bool> FillFromFileAsync(QemuIoInvocation io, string path, Memory<byte> buffer)
    {
        byte[] pattern;
        try
        {
            pattern = await File.ReadAllBytesAsync(path, io.CancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            io.Console.Error($"{path}: {Errno.Describe(e is UnauthorizedAccessException ? 13 : e is FileNotFoundException or DirectoryNotFoundException ? Errno.ENOENT : Errno.Of(e))}\n");
            return false;
        }
        if (pattern.Length == 0)
        {
            return true;
        }
        for (var at = 0; at < buffer.Length; at += pattern.Length)
        {
            pattern.AsSpan(0, Math.Min(pattern.Length, buffer.Length - at)).CopyTo(buffer.Span[at..]);
        }
        return true;
    }
}
