namespace Backup.Block.Posix;

/// <summary>The mode of the Unix socket files the daemon creates.</summary>
public static class SocketFiles
{
    /// <summary>
    /// Only the daemon's user may connect: a socket file is made 0600 between bind and listen, so no
    /// other user can connect in between. QEMU leaves the mode to the umask (0755 with the usual 022,
    /// which also lets no other user connect, since connecting needs write permission); 0600 does not
    /// depend on the umask the daemon was started with. Give a group access with a socket in a
    /// directory of that group and chmod, or through a systemd socket (fd=N).
    /// </summary>
    public const UnixFileMode Mode = UnixFileMode.UserRead | UnixFileMode.UserWrite;

    public static void RestrictToOwner(string path)
    {
        if (!OperatingSystem.IsWindows())
        {
            File.SetUnixFileMode(path, Mode);
        }
    }
}
