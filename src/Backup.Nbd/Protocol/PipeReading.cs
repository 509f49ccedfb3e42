using System.Buffers;
using System.IO.Pipelines;

namespace Backup.Nbd.Protocol;

/// <summary>
/// Exact-length reads over a <see cref="PipeReader"/>: NBD frames carry their own lengths, so the
/// connection loop only ever needs "the next N bytes" or "skip N bytes". Each call advances the
/// reader past what it consumed and marks everything it saw as examined.
/// </summary>
internal static class PipeReading
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
