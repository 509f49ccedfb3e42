using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Backup.Block.Drivers.Nbd;
using Backup.Nbd.Protocol;

namespace Backup.Block.Tests.Nbd;

/// <summary>
/// The client's request table and reply reader against a scripted server on the other end of a socket:
/// replies out of order, chunked reads and errors, and replies that break the protocol (wrong cookie, bad
/// magic, oversize chunk), which must end the connection with a clear reason and fail what is in flight.
/// </summary>
#pragma warning disable CA1001 // xUnit disposes through IAsyncLifetime.DisposeAsync
public sealed class NbdClientConnectionTests : IAsyncLifetime
{
    private Socket _server = null!;
    private NetworkStream _serverStream = null!;
    private NbdClientConnection _client = null!;

    public async Task InitializeAsync()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        var clientSocket = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        await clientSocket.ConnectAsync(listener.LocalEndPoint!);
        _server = await listener.AcceptAsync();
        _serverStream = new NetworkStream(_server, ownsSocket: true);
        var info = new NbdExportInfo { Size = 1 << 20, TransmissionFlags = 0, StructuredReplies = true, MetaContextId = 7 };
        _client = new NbdClientConnection(new NetworkStream(clientSocket, ownsSocket: true), info, clientSocket);
    }

    public async Task DisposeAsync()
    {
        await _client.DisposeAsync();
        await _serverStream.DisposeAsync();
    }

    private async Task<NbdRequest> ReadRequestAsync()
    {
        var header = new byte[NbdRequest.Size];
        await _serverStream.ReadExactlyAsync(header);
        NbdRequest.TryRead(header, out var request);
        request.Magic.Should().Be(NbdWire.NBD_REQUEST_MAGIC);
        if (request.Type == NbdWire.NBD_CMD_WRITE)
        {
            await _serverStream.ReadExactlyAsync(new byte[request.Length]);
        }
        return request;
    }

    private Task SendChunkAsync(ulong cookie, ushort type, ushort flags, byte[] payload, uint? magic = null)
    {
        var frame = new byte[NbdStructuredReplyHeader.Size + payload.Length];
        new NbdStructuredReplyHeader(flags, type, cookie, (uint)payload.Length).WriteTo(frame);
        if (magic is { } m)
        {
            BinaryPrimitives.WriteUInt32BigEndian(frame, m);
        }
        payload.CopyTo(frame, NbdStructuredReplyHeader.Size);
        return _serverStream.WriteAsync(frame).AsTask();
    }

    private static byte[] Data(ulong offset, byte fill, int length)
    {
        var p = new byte[8 + length];
        BinaryPrimitives.WriteUInt64BigEndian(p, offset);
        p.AsSpan(8).Fill(fill);
        return p;
    }

    private ValueTask<NbdReply> ReadAsync(ulong offset, Memory<byte> buffer) =>
        _client.RequestAsync(NbdWire.NBD_CMD_READ, 0, offset, (uint)buffer.Length, default, buffer, CancellationToken.None);

    [Fact]
    public async Task Replies_out_of_order_complete_the_request_they_name()
    {
        var buffers = Enumerable.Range(0, 8).Select(_ => new byte[4096]).ToArray();
        var reads = buffers.Select((b, i) => ReadAsync((ulong)(i * 4096), b).AsTask()).ToArray();
        var requests = new List<NbdRequest>();
        for (var i = 0; i < 8; i++)
        {
            requests.Add(await ReadRequestAsync());
        }
        requests.Select(r => r.Cookie).Should().OnlyHaveUniqueItems();
        foreach (var r in requests.AsEnumerable().Reverse())
        {
            var fill = (byte)(r.Offset / 4096 + 1);
            // Two data chunks per read, the second one with DONE.
            await SendChunkAsync(r.Cookie, NbdWire.NBD_REPLY_TYPE_OFFSET_DATA, 0, Data(r.Offset + 2048, fill, 2048));
            await SendChunkAsync(r.Cookie, NbdWire.NBD_REPLY_TYPE_OFFSET_DATA, NbdWire.NBD_REPLY_FLAG_DONE, Data(r.Offset, fill, 2048));
        }
        var replies = await Task.WhenAll(reads);
        replies.Should().OnlyContain(r => r.Outcome == NbdReplyOutcome.Replied && r.Error == 0);
        for (var i = 0; i < 8; i++)
        {
            buffers[i].Should().OnlyContain(b => b == i + 1);
        }
    }

    [Fact]
    public async Task An_error_chunk_fails_only_its_request()
    {
        var write = _client.RequestAsync(NbdWire.NBD_CMD_WRITE, 0, 0, 512, new byte[512], default, CancellationToken.None).AsTask();
        var request = await ReadRequestAsync();
        var payload = new byte[6 + 4];
        BinaryPrimitives.WriteUInt32BigEndian(payload, NbdWire.NBD_ENOSPC);
        BinaryPrimitives.WriteUInt16BigEndian(payload.AsSpan(4), 4);
        "full"u8.CopyTo(payload.AsSpan(6));
        await SendChunkAsync(request.Cookie, NbdWire.NBD_REPLY_TYPE_ERROR, NbdWire.NBD_REPLY_FLAG_DONE, payload);
        var reply = await write;
        reply.Should().Be(new NbdReply(NbdReplyOutcome.Replied, NbdWire.NBD_ENOSPC, 0, 0));
        _client.IsClosed.Should().BeFalse();

        // The connection goes on: a hole chunk answers the next read with zeros.
        var buffer = new byte[1024];
        buffer.AsSpan().Fill(0xff);
        var read = ReadAsync(0, buffer).AsTask();
        var r2 = await ReadRequestAsync();
        var hole = new byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(hole, 0);
        BinaryPrimitives.WriteUInt32BigEndian(hole.AsSpan(8), 1024);
        await SendChunkAsync(r2.Cookie, NbdWire.NBD_REPLY_TYPE_OFFSET_HOLE, NbdWire.NBD_REPLY_FLAG_DONE, hole);
        (await read).Error.Should().Be(0);
        buffer.Should().OnlyContain(b => b == 0);
    }

    [Fact]
    public async Task Block_status_takes_the_first_extent_of_the_negotiated_context()
    {
        var status = _client.RequestAsync(NbdWire.NBD_CMD_BLOCK_STATUS, NbdWire.NBD_CMD_FLAG_REQ_ONE, 0, 65536, default, default, CancellationToken.None).AsTask();
        var request = await ReadRequestAsync();
        var payload = new byte[4 + 16];
        BinaryPrimitives.WriteUInt32BigEndian(payload, 7);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(4), 4096);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(8), NbdWire.NBD_STATE_HOLE | NbdWire.NBD_STATE_ZERO);
        BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(12), 61440);
        await SendChunkAsync(request.Cookie, NbdWire.NBD_REPLY_TYPE_BLOCK_STATUS, NbdWire.NBD_REPLY_FLAG_DONE, payload);
        (await status).Should().Be(new NbdReply(NbdReplyOutcome.Replied, 0, 4096, NbdWire.NBD_STATE_HOLE | NbdWire.NBD_STATE_ZERO));
    }

    public static TheoryData<string> Malformed => new() { "wrong cookie", "bad magic", "oversize chunk", "data outside the read", "unknown context" };

    [Theory]
    [MemberData(nameof(Malformed))]
    public async Task A_reply_that_breaks_the_protocol_closes_the_connection_and_fails_what_is_in_flight(string fault)
    {
        var buffer = new byte[4096];
        var read = ReadAsync(8192, buffer).AsTask();
        var other = ReadAsync(0, new byte[512]).AsTask();
        var request = await ReadRequestAsync();
        await ReadRequestAsync();
        switch (fault)
        {
            case "wrong cookie":
                await SendChunkAsync(request.Cookie ^ 0x100000000, NbdWire.NBD_REPLY_TYPE_NONE, NbdWire.NBD_REPLY_FLAG_DONE, []);
                break;
            case "bad magic":
                await SendChunkAsync(request.Cookie, NbdWire.NBD_REPLY_TYPE_NONE, NbdWire.NBD_REPLY_FLAG_DONE, [], magic: 0xdeadbeef);
                break;
            case "oversize chunk":
                await SendChunkAsync(request.Cookie, NbdWire.NBD_REPLY_TYPE_OFFSET_DATA, NbdWire.NBD_REPLY_FLAG_DONE, Data(request.Offset, 1, 8192));
                break;
            case "data outside the read":
                await SendChunkAsync(request.Cookie, NbdWire.NBD_REPLY_TYPE_OFFSET_DATA, NbdWire.NBD_REPLY_FLAG_DONE, Data(0, 1, 4096));
                break;
            case "unknown context":
                var payload = new byte[12];
                BinaryPrimitives.WriteUInt32BigEndian(payload, 7);
                BinaryPrimitives.WriteUInt32BigEndian(payload.AsSpan(4), 4096);
                await SendChunkAsync(request.Cookie, NbdWire.NBD_REPLY_TYPE_BLOCK_STATUS, NbdWire.NBD_REPLY_FLAG_DONE, payload);
                break;
        }
        (await read.WaitAsync(TimeSpan.FromSeconds(10))).Outcome.Should().Be(NbdReplyOutcome.ConnectionLost);
        (await other.WaitAsync(TimeSpan.FromSeconds(10))).Outcome.Should().Be(NbdReplyOutcome.ConnectionLost);
        var reason = await _client.Closed.WaitAsync(TimeSpan.FromSeconds(10));
        reason.Should().BeOfType<NbdProtocolException>();
        // A closed connection refuses new requests at once.
        (await ReadAsync(0, new byte[512])).Outcome.Should().Be(NbdReplyOutcome.ConnectionLost);
    }

    [Fact]
    public async Task A_server_that_goes_away_fails_what_is_in_flight_as_lost()
    {
        var read = ReadAsync(0, new byte[4096]).AsTask();
        await ReadRequestAsync();
        _server.Shutdown(SocketShutdown.Both);
        (await read.WaitAsync(TimeSpan.FromSeconds(10))).Outcome.Should().Be(NbdReplyOutcome.ConnectionLost);
        (await _client.Closed).Should().NotBeOfType<NbdProtocolException>();
    }
}
