namespace Backup.Diagnostics.QemuIo;

/// <summary>The errno a failed request stands for, in glibc's words (qemu-io prints strerror(-ret)).</summary>
internal static class Errno
{
    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EIO = 5;
    public const int EINVAL = 22;
    public const int ENOSPC = 28;
    public const int ENOTSUP = 95;

    public static int Of(Exception e) => e switch
    {
        NotSupportedException => ENOTSUP,
        Block.BlockReadOnlyException => EPERM,
        Block.BlockRangeException => EIO,
        ArgumentOutOfRangeException => EINVAL,
        IOException io when io.HResult is > 0 and < 4096 => io.HResult,
        _ => EIO,
    };

    public static string Describe(int errno) => errno switch
    {
        EPERM => "Operation not permitted",
        ENOENT => "No such file or directory",
        EIO => "Input/output error",
        EINVAL => "Invalid argument",
        ENOSPC => "No space left on device",
        ENOTSUP => "Operation not supported",
        13 => "Permission denied",
        27 => "File too large",
        30 => "Read-only file system",
        122 => "Disk quota exceeded",
        _ => $"Unknown error {errno}",
    };

    public static string Describe(Exception e) => Describe(Of(e));
}
