using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using Backup.Nbd.Protocol;

namespace Backup.Nbd.Tests.Support;

/// <summary>
/// A scriptable NBD client for protocol tests. It speaks through the production codec (NbdWire
/// structs), so client and server cannot drift apart, but lets a test send anything, valid or not.
/// </summary>
internal sealed class NbdTestClient : IAsyncDisposable
{
    private readonly Stream _read;
    private readonly Stream _write;
    private readonly Socket? _socket;

    public NbdTestClient(Stream read, Stream write, Socket? socket = null)
    {
        _read = read;
        _write = write;
        _socket = socket;
    }

    public bool Structured { get; private set; }

    public static async Task<NbdTestClient> ConnectAsync(string socketPath)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath));
        var stream = new NetworkStream(socket, ownsSocket: false);
        return new NbdTestClient(stream, stream, socket);
    }

    public async Task<byte[]> ReadExactlyAsync(int count)
    {
        var buf = new byte[count];
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await _read.ReadExactlyAsync(buf, cts.Token);
        return buf;
    }

    /// <summary>True when the server closed the connection (EOF) within the timeout.</summary>
    public async Task<bool> IsClosedByServerAsync()
    {
        var buf = new byte[1];
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        try
        {
            return await _read.ReadAsync(buf, cts.Token) == 0;
        }
        catch (IOException)
        {
            return true;
        }
    }

    public Task WriteAsync(byte[] bytes) => _write.WriteAsync(bytes).AsTask().ContinueWith(_ => _write.FlushAsync()).Unwrap();

    public async Task<ushort> ReadGreetingAsync()
    {
        var g = await ReadExactlyAsync(NbdServerGreeting.Size);
        NbdServerGreeting.TryRead(g, out var greeting).Should().BeTrue("the server starts with NBDMAGIC IHAVEOPT");
        return greeting.HandshakeFlags;
    }

    public Task SendClientFlagsAsync(uint flags)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, flags);
        return WriteAsync(b);
    }

    /// <summary>Greeting and client flags (fixed newstyle, no zeroes).</summary>
    public async Task StartAsync(uint flags = NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE | NbdWire.NBD_FLAG_C_NO_ZEROES)
    {
        await ReadGreetingAsync();
        await SendClientFlagsAsync(flags);
    }

    public Task SendOptionAsync(uint option, byte[] data, ulong magic = NbdWire.IHAVEOPT)
    {
        var b = new byte[NbdOptionHeader.Size + data.Length];
        new NbdOptionHeader(magic, option, (uint)data.Length).WriteTo(b);
        data.CopyTo(b, NbdOptionHeader.Size);
        return WriteAsync(b);
    }

    public async Task<(NbdOptionReplyHeader Header, byte[] Data)> ReadOptionReplyAsync()
    {
        var h = await ReadExactlyAsync(NbdOptionReplyHeader.Size);
        NbdOptionReplyHeader.TryRead(h, out var header).Should().BeTrue("option replies carry NBD_REP_MAGIC");
        return (header, await ReadExactlyAsync((int)header.Length));
    }

    /// <summary>Reads replies up to and including the final one (ACK or an error).</summary>
    public async Task<List<(NbdOptionReplyHeader Header, byte[] Data)>> ReadOptionRepliesAsync()
    {
        var list = new List<(NbdOptionReplyHeader, byte[])>();
        while (true)
        {
            var r = await ReadOptionReplyAsync();
            list.Add(r);
            if (r.Header.ReplyType == NbdWire.NBD_REP_ACK || (r.Header.ReplyType & 0x80000000) != 0)
            {
                return list;
            }
        }
    }

    public static byte[] InfoRequest(string name, params ushort[] infos)
    {
        var n = Encoding.UTF8.GetBytes(name);
        var b = new byte[4 + n.Length + 2 + infos.Length * 2];
        BinaryPrimitives.WriteUInt32BigEndian(b, (uint)n.Length);
        n.CopyTo(b, 4);
        BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(4 + n.Length), (ushort)infos.Length);
        for (var i = 0; i < infos.Length; i++)
        {
            BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(6 + n.Length + i * 2), infos[i]);
        }
        return b;
    }

    public static byte[] MetaRequest(string name, params string[] queries)
    {
        var ms = new MemoryStream();
        var n = Encoding.UTF8.GetBytes(name);
        Span<byte> u32 = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(u32, (uint)n.Length);
        ms.Write(u32);
        ms.Write(n);
        BinaryPrimitives.WriteUInt32BigEndian(u32, (uint)queries.Length);
        ms.Write(u32);
        foreach (var q in queries)
        {
            var qb = Encoding.UTF8.GetBytes(q);
            BinaryPrimitives.WriteUInt32BigEndian(u32, (uint)qb.Length);
            ms.Write(u32);
            ms.Write(qb);
        }
        return ms.ToArray();
    }

    public async Task NegotiateStructuredAsync()
    {
        await SendOptionAsync(NbdWire.NBD_OPT_STRUCTURED_REPLY, []);
        var r = await ReadOptionReplyAsync();
        r.Header.ReplyType.Should().Be(NbdWire.NBD_REP_ACK);
        Structured = true;
    }

    /// <summary>The whole handshake: optional structured replies and contexts, then NBD_OPT_GO. Returns size and flags.</summary>
    public async Task<(long Size, ushort Flags, Dictionary<string, uint> Contexts)> HandshakeAsync(string export, bool structured = false,
        params string[] contexts)
    {
        await StartAsync();
        return await HandshakeAsyncAfterStart(export, structured, contexts);
    }

    public async Task<(long Size, ushort Flags, Dictionary<string, uint> Contexts)> HandshakeAsyncAfterStart(string export, bool structured = false,
        params string[] contexts)
    {
        var ids = new Dictionary<string, uint>();
        if (structured)
        {
            await NegotiateStructuredAsync();
        }
        if (contexts.Length > 0)
        {
            await SendOptionAsync(NbdWire.NBD_OPT_SET_META_CONTEXT, MetaRequest(export, contexts));
            foreach (var (h, d) in await ReadOptionRepliesAsync())
            {
                if (h.ReplyType == NbdWire.NBD_REP_META_CONTEXT)
                {
                    ids[Encoding.UTF8.GetString(d, 4, d.Length - 4)] = BinaryPrimitives.ReadUInt32BigEndian(d);
                }
            }
        }
        await SendOptionAsync(NbdWire.NBD_OPT_GO, InfoRequest(export));
        long size = -1;
        ushort flags = 0;
        foreach (var (h, d) in await ReadOptionRepliesAsync())
        {
            h.ReplyType.Should().NotBe(NbdWire.NBD_REP_ERR_UNKNOWN, "export '{0}' should exist", export);
            if (h.ReplyType == NbdWire.NBD_REP_INFO && NbdInfoExport.TryRead(d, out var info))
            {
                size = (long)info.ExportSize;
                flags = info.TransmissionFlags;
            }
        }
        return (size, flags, ids);
    }

    public Task SendRequestAsync(ushort type, ulong offset, uint length, ulong cookie, ushort flags = 0, byte[]? payload = null,
        uint magic = NbdWire.NBD_REQUEST_MAGIC)
    {
        var b = new byte[NbdRequest.Size + (payload?.Length ?? 0)];
        new NbdRequest(magic, flags, type, cookie, offset, length).WriteTo(b);
        payload?.CopyTo(b, NbdRequest.Size);
        return WriteAsync(b);
    }

    /// <summary>A simple reply; <paramref name="readLength"/> bytes of data follow a successful READ.</summary>
    public async Task<(uint Error, ulong Cookie, byte[] Data)> ReadSimpleReplyAsync(int readLength = 0)
    {
        var h = await ReadExactlyAsync(NbdSimpleReply.Size);
        NbdSimpleReply.TryRead(h, out var reply).Should().BeTrue("a simple reply carries NBD_SIMPLE_REPLY_MAGIC");
        var data = reply.Error == 0 && readLength > 0 ? await ReadExactlyAsync(readLength) : [];
        return (reply.Error, reply.Cookie, data);
    }

    public async Task<(NbdStructuredReplyHeader Header, byte[] Payload)> ReadChunkAsync()
    {
        var h = await ReadExactlyAsync(NbdStructuredReplyHeader.Size);
        NbdStructuredReplyHeader.TryRead(h, out var header).Should().BeTrue("a chunk carries NBD_STRUCTURED_REPLY_MAGIC");
        return (header, await ReadExactlyAsync((int)header.Length));
    }

    /// <summary>All chunks of one structured reply (assumes no other reply is interleaved).</summary>
    public async Task<List<(NbdStructuredReplyHeader Header, byte[] Payload)>> ReadStructuredReplyAsync()
    {
        var list = new List<(NbdStructuredReplyHeader, byte[])>();
        while (true)
        {
            var c = await ReadChunkAsync();
            list.Add(c);
            if ((c.Header.Flags & NbdWire.NBD_REPLY_FLAG_DONE) != 0)
            {
                return list;
            }
        }
    }

    /// <summary>The error of a structured reply, 0 if none of its chunks is an error chunk.</summary>
    public static uint ErrorOf(List<(NbdStructuredReplyHeader Header, byte[] Payload)> chunks) =>
        chunks.Where(c => (c.Header.Type & 0x8000) != 0).Select(c => BinaryPrimitives.ReadUInt32BigEndian(c.Payload)).FirstOrDefault();

    public async ValueTask DisposeAsync()
    {
        if (_socket is not null)
        {
            _socket.Dispose();
        }
        else
        {
            await _write.DisposeAsync();
            await _read.DisposeAsync();
        }
    }

    public void Abort() => _socket?.Dispose();
}
