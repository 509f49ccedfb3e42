using Backup.Block;

namespace Backup.Nbd.Protocol;

/// <summary>
/// The one place where a failure becomes an NBD error value. Everything a request handler throws goes
/// through <see cref="ToNbdError"/>; nothing else picks NBD_E* values for exceptions.
/// </summary>
internal static class NbdErrors
{
    // Linux errno values an IOException may carry in HResult (the runtime and our LibC put errno there).
    private const int EPERM = 1;
    private const int EIO = 5;
    private const int ENOMEM = 12;
    private const int EACCES = 13;
    private const int EFBIG = 27;
    private const int EINVAL = 22;
    private const int ENOSPC = 28;
    private const int EROFS = 30;
    private const int EOVERFLOW = 75;
    private const int ENOTSUP = 95;
    private const int EDQUOT = 122;
    private const int ESHUTDOWN = 108;
    private const int ETIMEDOUT = 110;

    /// <summary>Maps an exception from the block layer (or our own code) to the NBD error sent to the client.</summary>
    public static uint ToNbdError(Exception exception) => exception switch
    {
        BlockReadOnlyException => NbdWire.NBD_EPERM,
        BlockRangeException => NbdWire.NBD_EINVAL,
        OperationCanceledException => NbdWire.NBD_ESHUTDOWN,
        OutOfMemoryException or InsufficientMemoryException => NbdWire.NBD_ENOMEM,
        NotSupportedException or PlatformNotSupportedException => NbdWire.NBD_ENOTSUP,
        UnauthorizedAccessException => NbdWire.NBD_EPERM,
        ArgumentException => NbdWire.NBD_EINVAL,
        IOException io when io.HResult is > 0 and < 4096 => FromErrno(io.HResult),
        BlockException { InnerException: { } inner } => ToNbdError(inner),
        _ => NbdWire.NBD_EIO,
    };

    /// <summary>Linux errno → the closest NBD error (the protocol has only a handful).</summary>
    public static uint FromErrno(int errno) => errno switch
    {
        EPERM or EROFS => NbdWire.NBD_EPERM,
        ENOMEM => NbdWire.NBD_ENOMEM,
        EINVAL => NbdWire.NBD_EINVAL,
        ENOSPC or EDQUOT or EFBIG => NbdWire.NBD_ENOSPC,
        EOVERFLOW => NbdWire.NBD_EOVERFLOW,
        ENOTSUP => NbdWire.NBD_ENOTSUP,
        ESHUTDOWN => NbdWire.NBD_ESHUTDOWN,
        EIO => NbdWire.NBD_EIO,
        // QEMU's server sends EINVAL for what the protocol has no code for; a copy-before-write timeout is one.
        // So is EACCES: a read of a snapshot view that cannot be read (snapshot-access).
        ETIMEDOUT or EACCES => NbdWire.NBD_EINVAL,
        _ => NbdWire.NBD_EIO,
    };

    public static string Describe(uint nbdError) => nbdError switch
    {
        NbdWire.NBD_SUCCESS => "success",
        NbdWire.NBD_EPERM => "Operation not permitted",
        NbdWire.NBD_EIO => "Input/output error",
        NbdWire.NBD_ENOMEM => "Cannot allocate memory",
        NbdWire.NBD_EINVAL => "Invalid argument",
        NbdWire.NBD_ENOSPC => "No space left on device",
        NbdWire.NBD_EOVERFLOW => "Value too large for defined data type",
        NbdWire.NBD_ENOTSUP => "Operation not supported",
        NbdWire.NBD_ESHUTDOWN => "Cannot send after transport endpoint shutdown",
        _ => $"error {nbdError}",
    };
}
