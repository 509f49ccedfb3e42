using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;

namespace Backup.IntegrationTests.Support;

/// <summary>
/// A small NBD client written from the protocol document (fixed newstyle, NBD_OPT_GO, simple replies),
/// independent of the daemon's own codec. Tests use it where qemu-io cannot help: one writer whose
/// writes to several exports must be strictly ordered, each acknowledged before the next is sent.
/// </summary>
public sealed class NbdConnection : IAsyncDisposable
{
    private const ulong NbdMagic = 0x4e42444d41474943;          // "NBDMAGIC"
    private const ulong OptionMagic = 0x49484156454f5054;       // "IHAVEOPT"
    private const ulong OptionReplyMagic = 0x3e889045565a9;
    private const uint RequestMagic = 0x25609513;
    private const uint SimpleReplyMagic = 0x67446698;
    private const uint FlagFixedNewstyle = 1, FlagNoZeroes = 2;
    private const uint OptGo = 7;
    private const uint RepAck = 1, RepInfo = 3;
    private const ushort InfoExport = 0;
    private const ushort CmdWrite = 1, CmdDisconnect = 2, CmdFlush = 3;

    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly byte[] _header = new byte[28];
    private ulong _cookie;

    private NbdConnection(Socket socket)
    {
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: false);
    }

    public long Size { get; private set; }

    public static async Task<NbdConnection> OpenAsync(string socketPath, string export)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(socketPath));
        var c = new NbdConnection(socket);
        await c.HandshakeAsync(export);
        return c;
    }

    private async Task HandshakeAsync(string export)
    {
        var greeting = await ReadAsync(18);
        if (BinaryPrimitives.ReadUInt64BigEndian(greeting) != NbdMagic || BinaryPrimitives.ReadUInt64BigEndian(greeting.AsSpan(8)) != OptionMagic)
        {
            throw new IOException("not a newstyle NBD server");
        }
        var flags = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(flags, FlagFixedNewstyle | FlagNoZeroes);
        await _stream.WriteAsync(flags);

        var name = Encoding.UTF8.GetBytes(export);
        var option = new byte[16 + 4 + name.Length + 2];
        BinaryPrimitives.WriteUInt64BigEndian(option, OptionMagic);
        BinaryPrimitives.WriteUInt32BigEndian(option.AsSpan(8), OptGo);
        BinaryPrimitives.WriteUInt32BigEndian(option.AsSpan(12), (uint)(4 + name.Length + 2));
        BinaryPrimitives.WriteUInt32BigEndian(option.AsSpan(16), (uint)name.Length);
        name.CopyTo(option, 20);
        await _stream.WriteAsync(option);

        while (true)
        {
            var reply = await ReadAsync(20);
            if (BinaryPrimitives.ReadUInt64BigEndian(reply) != OptionReplyMagic)
            {
                throw new IOException("bad option reply magic");
            }
            var type = BinaryPrimitives.ReadUInt32BigEndian(reply.AsSpan(12));
            var data = await ReadAsync((int)BinaryPrimitives.ReadUInt32BigEndian(reply.AsSpan(16)));
            if ((type & 0x80000000) != 0)
            {
                throw new IOException($"NBD_OPT_GO for '{export}' refused: {Encoding.UTF8.GetString(data)}");
            }
            if (type == RepInfo && BinaryPrimitives.ReadUInt16BigEndian(data) == InfoExport)
            {
                Size = (long)BinaryPrimitives.ReadUInt64BigEndian(data.AsSpan(2));
            }
            if (type == RepAck)
            {
                return;
            }
        }
    }

    /// <summary>Writes and waits for the server's acknowledgement.</summary>
    public async Task WriteAsync(long offset, ReadOnlyMemory<byte> data)
    {
        await SendAsync(CmdWrite, offset, data.Length);
        await _stream.WriteAsync(data);
        await ReceiveAsync();
    }

    public async Task FlushAsync()
    {
        await SendAsync(CmdFlush, 0, 0);
        await ReceiveAsync();
    }

    private ValueTask SendAsync(ushort type, long offset, int length)
    {
        var h = _header.AsSpan();
        BinaryPrimitives.WriteUInt32BigEndian(h, RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(h[4..], 0);
        BinaryPrimitives.WriteUInt16BigEndian(h[6..], type);
        BinaryPrimitives.WriteUInt64BigEndian(h[8..], ++_cookie);
        BinaryPrimitives.WriteUInt64BigEndian(h[16..], (ulong)offset);
        BinaryPrimitives.WriteUInt32BigEndian(h[24..], (uint)length);
        return _stream.WriteAsync(_header);
    }

    private async Task ReceiveAsync()
    {
        var reply = await ReadAsync(16);
        if (BinaryPrimitives.ReadUInt32BigEndian(reply) != SimpleReplyMagic || BinaryPrimitives.ReadUInt64BigEndian(reply.AsSpan(8)) != _cookie)
        {
            throw new IOException("unexpected NBD reply");
        }
        var error = BinaryPrimitives.ReadUInt32BigEndian(reply.AsSpan(4));
        if (error != 0)
        {
            throw new IOException($"NBD request failed with error {error}");
        }
    }

    private async Task<byte[]> ReadAsync(int count)
    {
        var buffer = new byte[count];
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await _stream.ReadExactlyAsync(buffer, timeout.Token);
        return buffer;
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            await SendAsync(CmdDisconnect, 0, 0);
        }
        catch (IOException)
        {
            // The server may already be gone; the socket is closed either way.
        }
        await _stream.DisposeAsync();
        _socket.Dispose();
    }
}
