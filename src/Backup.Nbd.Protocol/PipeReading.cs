using System.Buffers;
using System.IO.Pipelines;

namespace Backup.Nbd.Protocol;

/// <summary>
/// Exact-length reads over a <see cref="PipeReader"/>: NBD frames carry their own lengths, so the
/// connection loop only ever needs "the next N bytes" or "skip N bytes". Each call advances the
/// reader past what it consumed and marks everything it saw as examined.
/// </summary>
public static class PipeReading
{
    /// <summary>Fills <paramref name="destination"/>; false if the peer closed before it was full.</summary>
    public static async ValueTask<bool> ReadExactAsync(this PipeReader reader, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var done = 0;
        while (done < destination.Length)
        {
            var result = await reader.ReadAsync(cancellationToken).ConfigureAwait(false);
            var buffer = result.Buffer;
            var n = (int)Math.Min(buffer.Length, destination.Length - done);
            buffer.Slice(0, n).CopyTo(destination.Span[done..]);
            done += n;
            reader.AdvanceTo(buffer.GetPosition(n), n == buffer.Length ? buffer.End : buffer.GetPosition(n));
            if (done < destination.Length && (result.IsCompleted || result.IsCanceled))
            {
                return false;
            }
        }
        return true;
    }

    /// <summary>
    /// Like <see cref="ReadExactAsync(PipeReader, Memory{byte}, CancellationToken)"/>, for large payloads: takes what the
    /// reader has already buffered, then reads the rest straight from <paramref name="source"/> (the stream the reader
    /// wraps) into <paramref name="destination"/>, saving a copy through the pipe. Only valid while nothing else reads
    /// the reader, and only for a reader made by <c>PipeReader.Create(source)</c>, which reads the stream only when asked.
    /// </summary>
    public static async ValueTask<bool> ReadExactAsync(this PipeReader reader, Stream source, Memory<byte> destination, CancellationToken cancellationToken)
    {
        var done = 0;
        if (reader.TryRead(out var result))
        {
            var buffer = result.Buffer;
            var n = (int)Math.Min(buffer.Length, destination.Length);
            buffer.Slice(0, n).CopyTo(destination.Span);
            done = n;
            reader.AdvanceTo(buffer.GetPosition(n), n == buffer.Length ? buffer.End : buffer.GetPosition(n));
            if (done < destination.Length && (result.IsCompleted || result.IsCanceled))
            {
                return false;
            }
        }
        while (done < destination.Length)
        {
            var n = await source.ReadAsync(destination[done..], cancellationToken).ConfigureAwait(false);
            if (n == 0)
            {
                return false;
            }
            done += n;
        }
        return true;
    }

    /// <summary>Discards <paramref name="count"/> bytes without buffering them; false if the peer closed first.</summary>
    public static async ValueTask<bool> SkipAsync(this PipeReader reader, long count, CancellationToken cancellationToken)
    {
        while (count > 0)
        {
            var result = await reader.ReadAsync(cancellationToken).ConfigureAwait(false);
            var buffer = result.Buffer;
            var n = Math.Min(buffer.Length, count);
            count -= n;
            reader.AdvanceTo(buffer.GetPosition(n), n == buffer.Length ? buffer.End : buffer.GetPosition(n));
            if (count > 0 && (result.IsCompleted || result.IsCanceled))
            {
                return false;
            }
        }
        return true;
    }
}
