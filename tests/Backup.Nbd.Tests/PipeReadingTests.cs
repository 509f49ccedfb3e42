using System.IO.Pipelines;
using Backup.Nbd.Protocol;

namespace Backup.Nbd.Tests;

/// <summary>Exact reads that take what the pipe has buffered, then the rest straight from the stream underneath.</summary>
public sealed class PipeReadingTests
{
    /// <summary>A stream that returns at most <c>chunk</c> bytes per read, like a socket.</summary>
    private sealed class TrickleStream(byte[] data, int chunk) : MemoryStream(data)
    {
        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
            base.ReadAsync(buffer[..Math.Min(buffer.Length, chunk)], cancellationToken);

        public override int Read(byte[] buffer, int offset, int count) => base.Read(buffer, offset, Math.Min(count, chunk));
    }

    [Theory]
    [InlineData(1000, 4096)]
    [InlineData(70_000, 4096)]
    [InlineData(300_000, 65536)]
    [InlineData(300_000, 1 << 20)]
    public async Task Header_then_direct_payload_then_header_stay_in_sync(int chunk, int pipeBuffer)
    {
        var data = new byte[16 + 200_000 + 16 + 5];
        new Random(7).NextBytes(data);
        using var stream = new TrickleStream(data, chunk);
        var reader = PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: pipeBuffer, minimumReadSize: Math.Min(pipeBuffer, 1024), leaveOpen: true));

        var header = new byte[16];
        (await reader.ReadExactAsync(header, default)).Should().BeTrue();
        header.Should().Equal(data[..16]);

        var payload = new byte[200_000];
        (await reader.ReadExactAsync(stream, payload, default)).Should().BeTrue();
        payload.Should().Equal(data[16..200_016]);

        (await reader.ReadExactAsync(header, default)).Should().BeTrue();
        header.Should().Equal(data[200_016..200_032]);

        // Five bytes are left: a 100 KiB payload is torn.
        (await reader.ReadExactAsync(stream, new byte[100_000], default)).Should().BeFalse();
        await reader.CompleteAsync();
    }
}
