using System.Buffers.Binary;

namespace Backup.Nbd.Protocol;

/// <summary>
/// Every NBD constant and wire structure, named as in the protocol specification
/// (NetworkBlockDevice/nbd doc/proto.md) and QEMU's docs/interop/nbd.txt.
/// Everything on the wire is big-endian (network byte order).
/// </summary>
public static class NbdWire
{
    // ------------------------------------------------------------------ handshake magics (proto.md "Newstyle negotiation")

    /// <summary>"NBDMAGIC": the first 8 bytes the server sends.</summary>
    public const ulong NBDMAGIC = 0x4e42444d41474943;

    /// <summary>"IHAVEOPT": sent by the server after NBDMAGIC, and by the client before every option.</summary>
    public const ulong IHAVEOPT = 0x49484156454F5054;

    /// <summary>Magic of every option reply (proto.md "Fixed newstyle negotiation").</summary>
    public const ulong NBD_REP_MAGIC = 0x3e889045565a9;

    // ------------------------------------------------------------------ handshake flags (16 bits, server → client)

    public const ushort NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
    public const ushort NBD_FLAG_NO_ZEROES = 1 << 1;

    // ------------------------------------------------------------------ client flags (32 bits, client → server)

    public const uint NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
    public const uint NBD_FLAG_C_NO_ZEROES = 1 << 1;

    // ------------------------------------------------------------------ transmission flags (16 bits, per export)

    public const ushort NBD_FLAG_HAS_FLAGS = 1 << 0;
    public const ushort NBD_FLAG_READ_ONLY = 1 << 1;
    public const ushort NBD_FLAG_SEND_FLUSH = 1 << 2;
    public const ushort NBD_FLAG_SEND_FUA = 1 << 3;
    public const ushort NBD_FLAG_ROTATIONAL = 1 << 4;
    public const ushort NBD_FLAG_SEND_TRIM = 1 << 5;
    public const ushort NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
    public const ushort NBD_FLAG_SEND_DF = 1 << 7;
    public const ushort NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
    public const ushort NBD_FLAG_SEND_RESIZE = 1 << 9;
    public const ushort NBD_FLAG_SEND_CACHE = 1 << 10;
    public const ushort NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

    // ------------------------------------------------------------------ options (proto.md "Option types")

    public const uint NBD_OPT_EXPORT_NAME = 1;
    public const uint NBD_OPT_ABORT = 2;
    public const uint NBD_OPT_LIST = 3;
    public const uint NBD_OPT_PEEK_EXPORT = 4;
    public const uint NBD_OPT_STARTTLS = 5;
    public const uint NBD_OPT_INFO = 6;
    public const uint NBD_OPT_GO = 7;
    public const uint NBD_OPT_STRUCTURED_REPLY = 8;
    public const uint NBD_OPT_LIST_META_CONTEXT = 9;
    public const uint NBD_OPT_SET_META_CONTEXT = 10;

    // ------------------------------------------------------------------ option reply types (proto.md "Option reply types")

    public const uint NBD_REP_ACK = 1;
    public const uint NBD_REP_SERVER = 2;
    public const uint NBD_REP_INFO = 3;
    public const uint NBD_REP_META_CONTEXT = 4;

    private const uint NBD_REP_FLAG_ERROR = 1u << 31;
    public const uint NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR | 1;
    public const uint NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR | 2;
    public const uint NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR | 3;
    public const uint NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4;
    public const uint NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5;
    public const uint NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6;
    public const uint NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7;
    public const uint NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8;
    public const uint NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9;

    // ------------------------------------------------------------------ NBD_REP_INFO types (proto.md "NBD_OPT_INFO and NBD_OPT_GO")

    public const ushort NBD_INFO_EXPORT = 0;
    public const ushort NBD_INFO_NAME = 1;
    public const ushort NBD_INFO_DESCRIPTION = 2;
    public const ushort NBD_INFO_BLOCK_SIZE = 3;

    // ------------------------------------------------------------------ transmission (proto.md "Transmission phase")

    public const uint NBD_REQUEST_MAGIC = 0x25609513;
    public const uint NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
    public const uint NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

    public const ushort NBD_CMD_READ = 0;
    public const ushort NBD_CMD_WRITE = 1;
    public const ushort NBD_CMD_DISC = 2;
    public const ushort NBD_CMD_FLUSH = 3;
    public const ushort NBD_CMD_TRIM = 4;
    public const ushort NBD_CMD_CACHE = 5;
    public const ushort NBD_CMD_WRITE_ZEROES = 6;
    public const ushort NBD_CMD_BLOCK_STATUS = 7;

    public const ushort NBD_CMD_FLAG_FUA = 1 << 0;
    public const ushort NBD_CMD_FLAG_NO_HOLE = 1 << 1;
    public const ushort NBD_CMD_FLAG_DF = 1 << 2;
    public const ushort NBD_CMD_FLAG_REQ_ONE = 1 << 3;
    public const ushort NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

    public const ushort NBD_REPLY_FLAG_DONE = 1 << 0;

    public const ushort NBD_REPLY_TYPE_NONE = 0;
    public const ushort NBD_REPLY_TYPE_OFFSET_DATA = 1;
    public const ushort NBD_REPLY_TYPE_OFFSET_HOLE = 2;
    public const ushort NBD_REPLY_TYPE_BLOCK_STATUS = 5;
    public const ushort NBD_REPLY_TYPE_ERROR = (1 << 15) + 1;
    public const ushort NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

    // ------------------------------------------------------------------ errors (proto.md "Error values")

    public const uint NBD_SUCCESS = 0;
    public const uint NBD_EPERM = 1;
    public const uint NBD_EIO = 5;
    public const uint NBD_ENOMEM = 12;
    public const uint NBD_EINVAL = 22;
    public const uint NBD_ENOSPC = 28;
    public const uint NBD_EOVERFLOW = 75;
    public const uint NBD_ENOTSUP = 95;
    public const uint NBD_ESHUTDOWN = 108;

    // ------------------------------------------------------------------ metadata contexts (proto.md "Metadata querying", QEMU nbd.txt)

    public const string BASE_ALLOCATION = "base:allocation";
    public const string QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth";
    public const string QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:";

    /// <summary>base:allocation: the extent is not allocated (reads as zeros or unspecified).</summary>
    public const uint NBD_STATE_HOLE = 1 << 0;

    /// <summary>base:allocation: the extent reads as zeros.</summary>
    public const uint NBD_STATE_ZERO = 1 << 1;

    /// <summary>qemu:dirty-bitmap:NAME: the extent is dirty.</summary>
    public const uint NBD_STATE_DIRTY = 1 << 0;

    // ------------------------------------------------------------------ limits

    /// <summary>Largest READ or WRITE payload we accept (QEMU's NBD_MAX_BUFFER_SIZE), advertised as the maximum block size.</summary>
    public const int NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024;

    /// <summary>Longest string (export name, description, context name) the spec allows.</summary>
    public const int NBD_MAX_STRING_SIZE = 4096;

    /// <summary>Preferred block size we advertise in NBD_INFO_BLOCK_SIZE.</summary>
    public const int NBD_PREFERRED_BLOCK_SIZE = 4096;

    /// <summary>Option data we are willing to buffer; anything larger is skipped and refused with NBD_REP_ERR_TOO_BIG.</summary>
    public const int MaxOptionLength = 64 * 1024;

    /// <summary>Zero bytes that follow the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was negotiated.</summary>
    public const int ExportNameZeroPad = 124;

    public static string CommandName(ushort type) => type switch
    {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_CACHE => "NBD_CMD_CACHE",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => $"NBD_CMD_{type}",
    };

    public static string OptionName(uint option) => option switch
    {
        NBD_OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        NBD_OPT_ABORT => "NBD_OPT_ABORT",
        NBD_OPT_LIST => "NBD_OPT_LIST",
        NBD_OPT_STARTTLS => "NBD_OPT_STARTTLS",
        NBD_OPT_INFO => "NBD_OPT_INFO",
        NBD_OPT_GO => "NBD_OPT_GO",
        NBD_OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        NBD_OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        NBD_OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => $"NBD_OPT_{option}",
    };
}

/// <summary>The server's first message (proto.md "Newstyle negotiation"): NBDMAGIC, IHAVEOPT, handshake flags.</summary>
public readonly record struct NbdServerGreeting(ushort HandshakeFlags)
{
    public const int Size = 18;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdWire.NBDMAGIC);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], NbdWire.IHAVEOPT);
        BinaryPrimitives.WriteUInt16BigEndian(destination[16..], HandshakeFlags);
    }

    public static bool TryRead(ReadOnlySpan<byte> source, out NbdServerGreeting value)
    {
        if (source.Length < Size || BinaryPrimitives.ReadUInt64BigEndian(source) != NbdWire.NBDMAGIC ||
            BinaryPrimitives.ReadUInt64BigEndian(source[8..]) != NbdWire.IHAVEOPT)
        {
            value = default;
            return false;
        }
        value = new NbdServerGreeting(BinaryPrimitives.ReadUInt16BigEndian(source[16..]));
        return true;
    }
}

/// <summary>The header of one client option (proto.md "Newstyle negotiation"): IHAVEOPT, option, length; data follows.</summary>
public readonly record struct NbdOptionHeader(ulong Magic, uint Option, uint Length)
{
    public const int Size = 16;

    public static bool TryRead(ReadOnlySpan<byte> source, out NbdOptionHeader value)
    {
        if (source.Length < Size)
        {
            value = default;
            return false;
        }
        value = new NbdOptionHeader(
            BinaryPrimitives.ReadUInt64BigEndian(source),
            BinaryPrimitives.ReadUInt32BigEndian(source[8..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[12..]));
        return true;
    }

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, Magic);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], Option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], Length);
    }
}

/// <summary>The header of one option reply (proto.md "Fixed newstyle negotiation"): magic, option, reply type, length.</summary>
public readonly record struct NbdOptionReplyHeader(uint Option, uint ReplyType, uint Length)
{
    public const int Size = 20;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, NbdWire.NBD_REP_MAGIC);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], Option);
        BinaryPrimitives.WriteUInt32BigEndian(destination[12..], ReplyType);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], Length);
    }

    public static bool TryRead(ReadOnlySpan<byte> source, out NbdOptionReplyHeader value)
    {
        if (source.Length < Size || BinaryPrimitives.ReadUInt64BigEndian(source) != NbdWire.NBD_REP_MAGIC)
        {
            value = default;
            return false;
        }
        value = new NbdOptionReplyHeader(
            BinaryPrimitives.ReadUInt32BigEndian(source[8..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[12..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[16..]));
        return true;
    }
}

/// <summary>The reply to NBD_OPT_EXPORT_NAME (proto.md "Newstyle negotiation"): size, transmission flags, optional 124 zero bytes.</summary>
public readonly record struct NbdExportNameReply(ulong Size, ushort TransmissionFlags)
{
    public const int MinSize = 10;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, Size);
        BinaryPrimitives.WriteUInt16BigEndian(destination[8..], TransmissionFlags);
    }
}

/// <summary>NBD_INFO_EXPORT payload of NBD_REP_INFO: info type, export size, transmission flags.</summary>
public readonly record struct NbdInfoExport(ulong ExportSize, ushort TransmissionFlags)
{
    public const int Size = 12;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt16BigEndian(destination, NbdWire.NBD_INFO_EXPORT);
        BinaryPrimitives.WriteUInt64BigEndian(destination[2..], ExportSize);
        BinaryPrimitives.WriteUInt16BigEndian(destination[10..], TransmissionFlags);
    }

    public static bool TryRead(ReadOnlySpan<byte> source, out NbdInfoExport value)
    {
        if (source.Length < Size || BinaryPrimitives.ReadUInt16BigEndian(source) != NbdWire.NBD_INFO_EXPORT)
        {
            value = default;
            return false;
        }
        value = new NbdInfoExport(BinaryPrimitives.ReadUInt64BigEndian(source[2..]), BinaryPrimitives.ReadUInt16BigEndian(source[10..]));
        return true;
    }
}

/// <summary>NBD_INFO_BLOCK_SIZE payload of NBD_REP_INFO: info type, minimum, preferred and maximum block size.</summary>
public readonly record struct NbdInfoBlockSize(uint Minimum, uint Preferred, uint Maximum)
{
    public const int Size = 14;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt16BigEndian(destination, NbdWire.NBD_INFO_BLOCK_SIZE);
        BinaryPrimitives.WriteUInt32BigEndian(destination[2..], Minimum);
        BinaryPrimitives.WriteUInt32BigEndian(destination[6..], Preferred);
        BinaryPrimitives.WriteUInt32BigEndian(destination[10..], Maximum);
    }
}

/// <summary>One transmission request (proto.md "Request message"); WRITE data follows it.</summary>
public readonly record struct NbdRequest(uint Magic, ushort Flags, ushort Type, ulong Cookie, ulong Offset, uint Length)
{
    public const int Size = 28;

    public static bool TryRead(ReadOnlySpan<byte> source, out NbdRequest value)
    {
        if (source.Length < Size)
        {
            value = default;
            return false;
        }
        value = new NbdRequest(
            BinaryPrimitives.ReadUInt32BigEndian(source),
            BinaryPrimitives.ReadUInt16BigEndian(source[4..]),
            BinaryPrimitives.ReadUInt16BigEndian(source[6..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[8..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[16..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[24..]));
        return true;
    }

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, Magic);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], Flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], Type);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(destination[16..], Offset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[24..], Length);
    }
}

/// <summary>A simple reply (proto.md "Simple reply message"): magic, error, cookie; READ data follows on success.</summary>
public readonly record struct NbdSimpleReply(uint Error, ulong Cookie)
{
    public const int Size = 16;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdWire.NBD_SIMPLE_REPLY_MAGIC);
        BinaryPrimitives.WriteUInt32BigEndian(destination[4..], Error);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], Cookie);
    }

    public static bool TryRead(ReadOnlySpan<byte> source, out NbdSimpleReply value)
    {
        if (source.Length < Size || BinaryPrimitives.ReadUInt32BigEndian(source) != NbdWire.NBD_SIMPLE_REPLY_MAGIC)
        {
            value = default;
            return false;
        }
        value = new NbdSimpleReply(BinaryPrimitives.ReadUInt32BigEndian(source[4..]), BinaryPrimitives.ReadUInt64BigEndian(source[8..]));
        return true;
    }
}

/// <summary>The header of one structured reply chunk (proto.md "Structured reply chunk message"): magic, flags, type, cookie, length.</summary>
public readonly record struct NbdStructuredReplyHeader(ushort Flags, ushort Type, ulong Cookie, uint Length)
{
    public const int Size = 20;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, NbdWire.NBD_STRUCTURED_REPLY_MAGIC);
        BinaryPrimitives.WriteUInt16BigEndian(destination[4..], Flags);
        BinaryPrimitives.WriteUInt16BigEndian(destination[6..], Type);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], Cookie);
        BinaryPrimitives.WriteUInt32BigEndian(destination[16..], Length);
    }

    public static bool TryRead(ReadOnlySpan<byte> source, out NbdStructuredReplyHeader value)
    {
        if (source.Length < Size || BinaryPrimitives.ReadUInt32BigEndian(source) != NbdWire.NBD_STRUCTURED_REPLY_MAGIC)
        {
            value = default;
            return false;
        }
        value = new NbdStructuredReplyHeader(
            BinaryPrimitives.ReadUInt16BigEndian(source[4..]),
            BinaryPrimitives.ReadUInt16BigEndian(source[6..]),
            BinaryPrimitives.ReadUInt64BigEndian(source[8..]),
            BinaryPrimitives.ReadUInt32BigEndian(source[16..]));
        return true;
    }
}

/// <summary>NBD_REPLY_TYPE_OFFSET_HOLE payload: offset, hole size.</summary>
public readonly record struct NbdOffsetHole(ulong Offset, uint HoleSize)
{
    public const int Size = 12;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt64BigEndian(destination, Offset);
        BinaryPrimitives.WriteUInt32BigEndian(destination[8..], HoleSize);
    }
}

/// <summary>One descriptor of an NBD_REPLY_TYPE_BLOCK_STATUS payload: extent length, status flags.</summary>
public readonly record struct NbdBlockDescriptor(uint Length, uint StatusFlags)
{
    public const int Size = 8;

    public void WriteTo(Span<byte> destination)
    {
        BinaryPrimitives.WriteUInt32BigEndian(destination, Length);
        BinaryPrimitives.WriteUInt32BigEndian(destination[4..], StatusFlags);
    }

    public static NbdBlockDescriptor Read(ReadOnlySpan<byte> source) =>
        new(BinaryPrimitives.ReadUInt32BigEndian(source), BinaryPrimitives.ReadUInt32BigEndian(source[4..]));
}
