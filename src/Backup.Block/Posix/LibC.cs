using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Backup.Block.Posix;

/// <summary>
/// The few Linux calls .NET does not expose: O_DIRECT opens, hole punching and zero ranges, SEEK_DATA /
/// SEEK_HOLE for allocation status, fdatasync, and st_blocks for the allocated size.
/// </summary>
internal static partial class LibC
{
    public const int O_RDONLY = 0;
    public const int O_RDWR = 2;
    public const int O_CREAT = 0x40;
    public const int O_CLOEXEC = 0x80000;
    public const int O_DIRECT = 0x4000;

    public const int FALLOC_FL_KEEP_SIZE = 0x01;
    public const int FALLOC_FL_PUNCH_HOLE = 0x02;
    public const int FALLOC_FL_ZERO_RANGE = 0x10;

    /// <summary>pwritev2 flag: this write is durable when the call returns (like O_DSYNC, for one write).</summary>
    public const int RWF_DSYNC = 0x2;

    public const int SEEK_DATA = 3;
    public const int SEEK_HOLE = 4;

    /// <summary>fcntl commands for open-file-description locks (Linux 3.15+): owned by the open file, not the process.</summary>
    public const int F_OFD_GETLK = 36;
    public const int F_OFD_SETLK = 37;
    public const short F_RDLCK = 0;
    public const short F_WRLCK = 1;
    public const short F_UNLCK = 2;

    public const int ENOENT = 2;
    public const int EAGAIN = 11;
    public const int EINTR = 4;
    public const int EIO = 5;
    public const int EACCES = 13;
    public const int EEXIST = 17;
    public const int EISDIR = 21;
    public const int EINVAL = 22;
    public const int ENOSPC = 28;
    public const int EROFS = 30;
    public const int ETIMEDOUT = 110;
    public const int ENXIO = 6;
    public const int EOPNOTSUPP = 95;

#pragma warning disable SYSLIB1054, CA5392 // plain blittable signatures; libc is resolved by the runtime
    [DllImport("libc", EntryPoint = "open", SetLastError = true)]
    private static extern int Open([MarshalAs(UnmanagedType.LPUTF8Str)] string path, int flags, int mode);

    [DllImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    private static extern int Fallocate(nint fd, int mode, long offset, long length);

    [DllImport("libc", EntryPoint = "lseek", SetLastError = true)]
    private static extern long Lseek(nint fd, long offset, int whence);

    [DllImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    private static extern int Fdatasync(nint fd);

    [DllImport("libc", EntryPoint = "pwritev2", SetLastError = true)]
    private static extern nint PWriteV2(nint fd, ref IoVec iov, int iovcnt, long offset, int flags);

    [DllImport("libc", EntryPoint = "fstat", SetLastError = true)]
    private static extern int Fstat(nint fd, byte[] buffer);

    [DllImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static extern int Fcntl(nint fd, int cmd, ref Flock lk);

    [DllImport("libc", EntryPoint = "strerror")]
    private static extern nint StrError(int errnum);
#pragma warning restore SYSLIB1054, CA5392

    /// <summary>Opens with raw open(2) flags (for O_DIRECT); throws <see cref="IOException"/> with errno in HResult.</summary>
    public static SafeFileHandle OpenHandle(string path, int flags)
    {
        var fd = Open(path, flags | O_CLOEXEC, 0);
        if (fd < 0)
        {
            throw ErrnoException(Marshal.GetLastPInvokeError());
        }
        return new SafeFileHandle(fd, ownsHandle: true);
    }

    /// <summary>fallocate(2); returns 0 or the errno.</summary>
    public static int Fallocate(SafeFileHandle handle, int mode, long offset, long length) =>
        WithFd(handle, fd => Fallocate(fd, mode, offset, length) == 0 ? 0 : Marshal.GetLastPInvokeError());

    /// <summary>lseek(2) with SEEK_DATA/SEEK_HOLE; returns the offset, or -errno (ENXIO: no more data).</summary>
    public static long Seek(SafeFileHandle handle, long offset, int whence) =>
        WithFd(handle, fd =>
        {
            var r = Lseek(fd, offset, whence);
            return r >= 0 ? r : -Marshal.GetLastPInvokeError();
        });

    public static void DataSync(SafeFileHandle handle)
    {
        var err = WithFd(handle, fd => Fdatasync(fd) == 0 ? 0 : Marshal.GetLastPInvokeError());
        if (err != 0)
        {
            throw ErrnoException(err);
        }
    }

    /// <summary>
    /// pwritev2(RWF_DSYNC) of a whole buffer: blocks until these bytes are on stable storage. Unlike a
    /// write followed by fdatasync it writes back only this range, not every dirty page of the file.
    /// Returns 0 or the errno.
    /// </summary>
    public static int WriteDurable(SafeFileHandle handle, byte[] buffer, int start, int length, long offset)
    {
        var pin = GCHandle.Alloc(buffer, GCHandleType.Pinned);
        try
        {
            var done = 0;
            while (done < length)
            {
                var iov = new IoVec(pin.AddrOfPinnedObject() + start + done, (nuint)(length - done));
                var n = WithFd(handle, fd => PWriteV2(fd, ref iov, 1, offset + done, RWF_DSYNC));
                if (n < 0)
                {
                    var err = Marshal.GetLastPInvokeError();
                    if (err != EINTR)
                    {
                        return err;
                    }
                    continue;
                }
                done += (int)n;
            }
            return 0;
        }
        finally
        {
            pin.Free();
        }
    }

    /// <summary>
    /// Sets (<paramref name="type"/> F_RDLCK / F_UNLCK) an open-file-description lock on
    /// [<paramref name="start"/>, +<paramref name="length"/>) without waiting; returns 0 or the errno (EAGAIN: held by another).
    /// </summary>
    public static int SetOfdLock(SafeFileHandle handle, short type, long start, long length)
    {
        var lk = new Flock { Type = type, Whence = 0, Start = start, Length = length };
        return WithFd(handle, fd => Fcntl(fd, F_OFD_SETLK, ref lk) == 0 ? 0 : Marshal.GetLastPInvokeError());
    }

    /// <summary>
    /// Asks whether a lock of <paramref name="type"/> on the range could be taken (F_OFD_GETLK). Returns 0
    /// when nobody else's lock is in the way, EAGAIN when one is, or another errno when the call failed
    /// (EINVAL: the kernel has no OFD locks).
    /// </summary>
    public static int TestOfdLock(SafeFileHandle handle, short type, long start, long length)
    {
        var lk = new Flock { Type = type, Whence = 0, Start = start, Length = length };
        return WithFd(handle, fd =>
        {
            if (Fcntl(fd, F_OFD_GETLK, ref lk) != 0)
            {
                return Marshal.GetLastPInvokeError();
            }
            return lk.Type == F_UNLCK ? 0 : EAGAIN;
        });
    }

    /// <summary>struct flock as Linux lays it out on 64-bit targets (x86_64, aarch64): 32 bytes.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct Flock
    {
        public short Type;
        public short Whence;
        public long Start;
        public long Length;
        public int Pid;
        private readonly int _padding;
    }

    [StructLayout(LayoutKind.Sequential)]
    private readonly struct IoVec(nint bas, nuint length)
    {
        public readonly nint Base = bas;
        public readonly nuint Length = length;
    }

    /// <summary>Bytes the file occupies on disk (st_blocks × 512).</summary>
    public static long AllocatedBytes(SafeFileHandle handle)
    {
        // struct stat keeps st_blocks at offset 64 on both x86_64 and aarch64 Linux.
        var buffer = new byte[256];
        var err = WithFd(handle, fd => Fstat(fd, buffer) == 0 ? 0 : Marshal.GetLastPInvokeError());
        return err == 0 ? BitConverter.ToInt64(buffer, 64) * 512 : 0;
    }

    public static string Describe(int errno) => errno switch
    {
        // glibc's texts, fixed here so that messages do not depend on the locale.
        ENOENT => "No such file or directory",
        EACCES => "Permission denied",
        EISDIR => "Is a directory",
        EINVAL => "Invalid argument",
        ENOSPC => "No space left on device",
        EROFS => "Read-only file system",
        EIO => "Input/output error",
        EEXIST => "File exists",
        EOPNOTSUPP => "Operation not supported",
        ETIMEDOUT => "Connection timed out",
        _ => Marshal.PtrToStringUTF8(StrError(errno)) ?? $"errno {errno}",
    };

    public static IOException ErrnoException(int errno) => new(Describe(errno), errno);

    /// <summary>The errno behind an I/O exception raised by .NET or by this class, if it can be found.</summary>
    public static int ErrnoOf(Exception e) => e switch
    {
        FileNotFoundException or DirectoryNotFoundException => ENOENT,
        UnauthorizedAccessException => EACCES,
        IOException io when io.HResult is > 0 and < 4096 => io.HResult,
        _ => EIO,
    };

    private static T WithFd<T>(SafeFileHandle handle, Func<nint, T> call)
    {
        var added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            return call(handle.DangerousGetHandle());
        }
        finally
        {
            if (added)
            {
                handle.DangerousRelease();
            }
        }
    }
}
