using System.Buffers;

namespace Backup.Diagnostics.QemuIo.Commands;

/// <summary>Limits and helpers shared by the data commands.</summary>
internal static class IoLimits
{
    /// <summary>BDRV_REQUEST_MAX_BYTES: INT_MAX rounded down to whole 512-byte sectors.</summary>
    public const long MaxRequestBytes = 2147483136;

    /// <summary>
    /// create_iovec: the lengths of a vectored request, each a cvtnum number; the vector is one buffer
    /// here (the node's I/O path takes contiguous memory), which the block layer cannot tell apart.
    /// </summary>
    public static bool TryParseVector(QemuIoInvocation io, IEnumerable<string> lengths, out long total)
    {
        total = 0;
        foreach (var arg in lengths)
        {
            if (!io.TryParseSize(arg, out var len))
            {
                return false;
            }
            if (len > MaxRequestBytes)
            {
                io.Print($"Argument '{arg}' exceeds maximum size {MaxRequestBytes}\n");
                return false;
            }
            if (total > MaxRequestBytes - len)
            {
                io.Print($"The total number of bytes exceed the maximum size {MaxRequestBytes}\n");
                return false;
            }
            total += len;
        }
        return true;
    }

    /// <summary>A pooled buffer of exactly <paramref name="length"/> bytes, filled with <paramref name="fill"/>.</summary>
    public static PooledBuffer Rent(long length, byte fill)
    {
        var array = ArrayPool<byte>.Shared.Rent((int)Math.Max(length, 1));
        array.AsSpan(0, (int)length).Fill(fill);
        return new PooledBuffer(array, (int)length);
    }
}

/// <summary>A rented array and the part of it in use; returned to the pool on dispose.</summary>
internal readonly struct PooledBuffer(byte[] array, int length) : IDisposable
{
    public Memory<byte> Memory => array.AsMemory(0, length);

    public Span<byte> Span => array.AsSpan(0, length);

    public void Dispose() => ArrayPool<byte>.Shared.Return(array);
}
