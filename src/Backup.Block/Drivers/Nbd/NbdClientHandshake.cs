using System.Buffers.Binary;
using System.Text;
using Backup.Nbd.Protocol;

namespace Backup.Block.Drivers.Nbd;

/// <summary>What the server agreed to for one export: its size and flags, block sizes, reply style, context.</summary>
public sealed record NbdExportInfo
{
    public required long Size { get; init; }
    public required ushort TransmissionFlags { get; init; }
    public required bool StructuredReplies { get; init; }

    /// <summary>Id of the metadata context block status asks for (base:allocation or x-dirty-bitmap), or null when none was granted.</summary>
    public uint? MetaContextId { get; init; }

    public uint MinimumBlockSize { get; init; } = 1;
    public uint PreferredBlockSize { get; init; } = 4096;
    public uint MaximumPayload { get; init; } = NbdWire.NBD_MAX_BUFFER_SIZE;

    public bool Has(ushort flag) => (TransmissionFlags & flag) != 0;
}

/// <summary>
/// Upgrades the stream to TLS when the driver was given <c>tls-creds</c>: the handshake sends NBD_OPT_STARTTLS,
/// and on the server's ACK hands the plain stream to this wrapper and goes on over the stream it returns.
/// </summary>
public interface INbdClientTls
{
    ValueTask<Stream> AuthenticateAsync(Stream plain, CancellationToken cancellationToken);
}

/// <summary>
/// The client side of the fixed newstyle handshake (proto.md "Fixed newstyle negotiation"), as QEMU's
/// nbd/client.c runs it: greeting, client flags, [STARTTLS], STRUCTURED_REPLY, SET_META_CONTEXT (one
/// context: base:allocation, or the x-dirty-bitmap name), then GO asking for NBD_INFO_BLOCK_SIZE. A server
/// that knows no GO gets NBD_OPT_EXPORT_NAME. Errors carry QEMU's texts.
/// </summary>
public static class NbdClientHandshake
{
    private static readonly UTF8Encoding Utf8 = new(false, true);

    /// <summary>Runs the handshake over <paramref name="stream"/>; returns the export and the stream transmission uses.</summary>
    public static async ValueTask<(NbdExportInfo Info, Stream Stream)> RunAsync(Stream stream, string export, string context,
        INbdClientTls? tls, CancellationToken cancellationToken)
    {
        var buf = new byte[NbdServerGreeting.Size];
        await stream.ReadExactlyAsync(buf, cancellationToken).ConfigureAwait(false);
        var magic = BinaryPrimitives.ReadUInt64BigEndian(buf);
        if (magic != NbdWire.NBDMAGIC)
        {
            throw new BlockException($"Bad initial magic received: 0x{magic:x16}");
        }
        var optMagic = BinaryPrimitives.ReadUInt64BigEndian(buf.AsSpan(8));
        if (optMagic != NbdWire.IHAVEOPT)
        {
            throw new BlockException("Server does not support newstyle negotiation");
        }
        var serverFlags = BinaryPrimitives.ReadUInt16BigEndian(buf.AsSpan(16));
        if ((serverFlags & NbdWire.NBD_FLAG_FIXED_NEWSTYLE) == 0)
        {
            throw new BlockException("Server does not support fixed newstyle negotiation");
        }
        var noZeroes = (serverFlags & NbdWire.NBD_FLAG_NO_ZEROES) != 0;
        var clientFlags = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(clientFlags,
            NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NbdWire.NBD_FLAG_C_NO_ZEROES : 0));
        await stream.WriteAsync(clientFlags, cancellationToken).ConfigureAwait(false);

        if (tls is not null)
        {
            await SendOptionAsync(stream, NbdWire.NBD_OPT_STARTTLS, [], cancellationToken).ConfigureAwait(false);
            var (reply, _) = await ReadReplyAsync(stream, NbdWire.NBD_OPT_STARTTLS, cancellationToken).ConfigureAwait(false);
            if (reply.ReplyType != NbdWire.NBD_REP_ACK)
            {
                throw new BlockException("Server don't support STARTTLS option");
            }
            stream = await tls.AuthenticateAsync(stream, cancellationToken).ConfigureAwait(false);
        }

        await SendOptionAsync(stream, NbdWire.NBD_OPT_STRUCTURED_REPLY, [], cancellationToken).ConfigureAwait(false);
        var structured = await ExpectAckAsync(stream, NbdWire.NBD_OPT_STRUCTURED_REPLY, cancellationToken).ConfigureAwait(false);

        uint? contextId = null;
        if (structured)
        {
            contextId = await SetMetaContextAsync(stream, export, context, cancellationToken).ConfigureAwait(false);
        }
        if (context != NbdWire.BASE_ALLOCATION && contextId is null)
        {
            // QSD 7.2 reports an x-dirty-bitmap the server does not offer with this text (checked live).
            throw new BlockException("Could not open image: Invalid argument");
        }

        var info = await GoAsync(stream, export, noZeroes, cancellationToken).ConfigureAwait(false);
        return (info with { StructuredReplies = structured, MetaContextId = contextId }, stream);
    }

    private static async ValueTask<uint?> SetMetaContextAsync(Stream stream, string export, string context, CancellationToken cancellationToken)
    {
        var name = Utf8.GetBytes(export);
        var ctx = Utf8.GetBytes(context);
        var data = new byte[4 + name.Length + 4 + 4 + ctx.Length];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)name.Length);
        name.CopyTo(data, 4);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(4 + name.Length), 1);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(8 + name.Length), (uint)ctx.Length);
        ctx.CopyTo(data, 12 + name.Length);
        await SendOptionAsync(stream, NbdWire.NBD_OPT_SET_META_CONTEXT, data, cancellationToken).ConfigureAwait(false);
        uint? id = null;
        while (true)
        {
            var (reply, payload) = await ReadReplyAsync(stream, NbdWire.NBD_OPT_SET_META_CONTEXT, cancellationToken).ConfigureAwait(false);
            switch (reply.ReplyType)
            {
                case NbdWire.NBD_REP_ACK:
                    return id;
                case NbdWire.NBD_REP_META_CONTEXT when payload.Length >= 4:
                    var granted = Utf8.GetString(payload, 4, payload.Length - 4);
                    if (granted != context || id is not null)
                    {
                        throw new BlockException($"Unexpected context name from server: {granted}");
                    }
                    id = BinaryPrimitives.ReadUInt32BigEndian(payload);
                    break;
                case NbdWire.NBD_REP_META_CONTEXT:
                    throw new BlockException("Incorrect meta context reply length");
                default:
                    // A server that refuses meta contexts still serves data; block status then reports everything as data.
                    if ((reply.ReplyType & 0x80000000u) != 0)
                    {
                        return null;
                    }
                    throw new BlockException($"Unexpected reply type {reply.ReplyType} to NBD_OPT_SET_META_CONTEXT");
            }
        }
    }

    private static async ValueTask<NbdExportInfo> GoAsync(Stream stream, string export, bool noZeroes, CancellationToken cancellationToken)
    {
        var name = Utf8.GetBytes(export);
        var data = new byte[4 + name.Length + 2 + 2];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)name.Length);
        name.CopyTo(data, 4);
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(4 + name.Length), 1);
        BinaryPrimitives.WriteUInt16BigEndian(data.AsSpan(6 + name.Length), NbdWire.NBD_INFO_BLOCK_SIZE);
        await SendOptionAsync(stream, NbdWire.NBD_OPT_GO, data, cancellationToken).ConfigureAwait(false);
        long? size = null;
        ushort flags = 0;
        uint min = 1, preferred = 4096, max = NbdWire.NBD_MAX_BUFFER_SIZE;
        while (true)
        {
            var (reply, payload) = await ReadReplyAsync(stream, NbdWire.NBD_OPT_GO, cancellationToken).ConfigureAwait(false);
            switch (reply.ReplyType)
            {
                case NbdWire.NBD_REP_INFO when payload.Length >= 2:
                    var type = BinaryPrimitives.ReadUInt16BigEndian(payload);
                    if (type == NbdWire.NBD_INFO_EXPORT)
                    {
                        if (!NbdInfoExport.TryRead(payload, out var e) || payload.Length != NbdInfoExport.Size)
                        {
                            throw new BlockException("remaining export info len 10 is unexpected size");
                        }
                        size = checked((long)e.ExportSize);
                        flags = e.TransmissionFlags;
                    }
                    else if (type == NbdWire.NBD_INFO_BLOCK_SIZE && payload.Length == NbdInfoBlockSize.Size)
                    {
                        min = BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(2));
                        preferred = BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(6));
                        max = BinaryPrimitives.ReadUInt32BigEndian(payload.AsSpan(10));
                        CheckBlockSizes(min, preferred, max);
                    }
                    break;
                case NbdWire.NBD_REP_ACK:
                    if (size is null)
                    {
                        throw new BlockException("broken server omitted NBD_INFO_EXPORT");
                    }
                    return new NbdExportInfo
                    {
                        Size = size.Value,
                        TransmissionFlags = flags,
                        StructuredReplies = false,
                        MinimumBlockSize = min,
                        PreferredBlockSize = preferred,
                        MaximumPayload = Math.Min(max, (uint)NbdWire.NBD_MAX_BUFFER_SIZE),
                    };
                case NbdWire.NBD_REP_ERR_UNSUP:
                    return await ExportNameAsync(stream, name, noZeroes, cancellationToken).ConfigureAwait(false);
                default:
                    throw new BlockException(DescribeError(reply.ReplyType, NbdWire.NBD_OPT_GO));
            }
        }
    }

    private static void CheckBlockSizes(uint min, uint preferred, uint max)
    {
        if (min == 0 || !uint.IsPow2(min) || min > 64 * 1024)
        {
            throw new BlockException($"server minimum block size {min} is not a power of two");
        }
        if (preferred < min || !uint.IsPow2(preferred))
        {
            throw new BlockException($"server preferred block size {preferred} is not valid");
        }
        if (max < min || (max % min != 0 && max != uint.MaxValue))
        {
            throw new BlockException($"server maximum block size {max} is not valid");
        }
    }

    /// <summary>Old servers: NBD_OPT_EXPORT_NAME ends the handshake with size and flags, no reply framing.</summary>
    private static async ValueTask<NbdExportInfo> ExportNameAsync(Stream stream, byte[] name, bool noZeroes, CancellationToken cancellationToken)
    {
        await SendOptionAsync(stream, NbdWire.NBD_OPT_EXPORT_NAME, name, cancellationToken).ConfigureAwait(false);
        var reply = new byte[NbdExportNameReply.MinSize + (noZeroes ? 0 : NbdWire.ExportNameZeroPad)];
        await stream.ReadExactlyAsync(reply, cancellationToken).ConfigureAwait(false);
        return new NbdExportInfo
        {
            Size = checked((long)BinaryPrimitives.ReadUInt64BigEndian(reply)),
            TransmissionFlags = BinaryPrimitives.ReadUInt16BigEndian(reply.AsSpan(8)),
            StructuredReplies = false,
        };
    }

    private static async ValueTask<bool> ExpectAckAsync(Stream stream, uint option, CancellationToken cancellationToken)
    {
        var (reply, _) = await ReadReplyAsync(stream, option, cancellationToken).ConfigureAwait(false);
        if (reply.ReplyType == NbdWire.NBD_REP_ACK)
        {
            return true;
        }
        if ((reply.ReplyType & 0x80000000u) != 0)
        {
            return false;
        }
        throw new BlockException($"Unexpected reply type {reply.ReplyType} to {NbdWire.OptionName(option)}");
    }

    private static async ValueTask SendOptionAsync(Stream stream, uint option, byte[] data, CancellationToken cancellationToken)
    {
        var frame = new byte[NbdOptionHeader.Size + data.Length];
        new NbdOptionHeader(NbdWire.IHAVEOPT, option, (uint)data.Length).WriteTo(frame);
        data.CopyTo(frame, NbdOptionHeader.Size);
        await stream.WriteAsync(frame, cancellationToken).ConfigureAwait(false);
    }

    private static async ValueTask<(NbdOptionReplyHeader Header, byte[] Payload)> ReadReplyAsync(Stream stream, uint option, CancellationToken cancellationToken)
    {
        var header = new byte[NbdOptionReplyHeader.Size];
        await stream.ReadExactlyAsync(header, cancellationToken).ConfigureAwait(false);
        if (!NbdOptionReplyHeader.TryRead(header, out var reply))
        {
            throw new BlockException("Unexpected option reply magic");
        }
        if (reply.Option != option)
        {
            throw new BlockException($"Unexpected option type {reply.Option}, expected {NbdWire.OptionName(option)}");
        }
        if (reply.Length > NbdWire.MaxOptionLength)
        {
            throw new BlockException($"Option reply of {reply.Length} bytes is too long");
        }
        var payload = new byte[reply.Length];
        await stream.ReadExactlyAsync(payload, cancellationToken).ConfigureAwait(false);
        return (reply, payload);
    }

    /// <summary>QEMU's texts for option errors (nbd/client.c nbd_handle_reply_err).</summary>
    private static string DescribeError(uint replyType, uint option) => replyType switch
    {
        NbdWire.NBD_REP_ERR_UNKNOWN => "Requested export not available",
        NbdWire.NBD_REP_ERR_POLICY => $"Requested option '{NbdWire.OptionName(option)}' is forbidden",
        NbdWire.NBD_REP_ERR_INVALID => $"Requested option '{NbdWire.OptionName(option)}' is invalid",
        NbdWire.NBD_REP_ERR_PLATFORM => $"Requested option '{NbdWire.OptionName(option)}' is not supported on this platform",
        NbdWire.NBD_REP_ERR_TLS_REQD => "TLS negotiation required before option 'NBD_OPT_GO'",
        NbdWire.NBD_REP_ERR_SHUTDOWN => "Server shutting down before option 'NBD_OPT_GO'",
        NbdWire.NBD_REP_ERR_BLOCK_SIZE_REQD => "Server requires INFO_BLOCK_SIZE for option 'NBD_OPT_GO'",
        NbdWire.NBD_REP_ERR_TOO_BIG => "Server rejected 'NBD_OPT_GO' as too long",
        _ => $"Unknown error code when asking for option 'NBD_OPT_GO': 0x{replyType:x}",
    };
}
