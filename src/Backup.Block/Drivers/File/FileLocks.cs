using Backup.Block.Permissions;
using Backup.Block.Posix;
using Microsoft.Win32.SafeHandles;

namespace Backup.Block.Drivers.File;

/// <summary>
/// QEMU's image locking protocol (block/file-posix.c), so that QEMU's tools and backupd see each other's
/// use of an image. Each permission is one byte: a shared (read) open-file-description lock on byte
/// 100 + bit while the node holds the permission, and on byte 200 + bit while it refuses to share it.
/// Before taking more, the node checks that no other open file holds a byte that conflicts: for each
/// permission it wants, byte 200 + bit (someone refuses to share it); for each it refuses to share,
/// byte 100 + bit (someone holds it). OFD locks belong to the open file, so two nodes on one image in
/// this process exclude each other too, and closing the file drops them.
/// </summary>
internal sealed class FileLocks(SafeFileHandle handle, string filename)
{
    public const int PermBase = 100;
    public const int SharedBase = 200;

    private BlockPermissions _lockedPerm;
    private BlockPermissions _lockedUnshared;
    private BlockPermissions _perm;
    private BlockPermissions _shared = BlockPermissions.All;

    /// <summary>True when the kernel supports OFD locks on this file (locking=auto takes them only then).</summary>
    public static bool Supported(SafeFileHandle handle) =>
        LibC.TestOfdLock(handle, LibC.F_WRLCK, PermBase, 1) is 0 or LibC.EAGAIN;

    /// <summary>
    /// Takes the bytes of both the old and the new state, then checks for conflicts (QEMU's RAW_PL_PREPARE).
    /// On failure the bytes are back as they were and the exception carries QEMU's text.
    /// </summary>
    public void Prepare(BlockPermissions perm, BlockPermissions shared)
    {
        if ((_perm | perm) == _perm && (_shared & shared) == _shared)
        {
            // Only giving up bytes: nothing to check, and unlocking cannot conflict.
            return;
        }
        try
        {
            Apply(_perm | perm, ~_shared | ~shared, unlock: false);
            Check(perm, shared);
        }
        catch
        {
            Abort();
            throw;
        }
    }

    /// <summary>Keeps exactly the new state's bytes (QEMU's RAW_PL_COMMIT); unlock errors are ignored, as QEMU does.</summary>
    public void Commit(BlockPermissions perm, BlockPermissions shared)
    {
        TryApply(perm, ~shared);
        _perm = perm;
        _shared = shared;
    }

    /// <summary>Back to the committed state's bytes (QEMU's RAW_PL_ABORT).</summary>
    public void Abort() => TryApply(_perm, ~_shared);

    /// <summary>The bytes this file holds now, for tests and diagnostics.</summary>
    public (BlockPermissions Perm, BlockPermissions Unshared) Held => (_lockedPerm, _lockedUnshared);

    private void TryApply(BlockPermissions perm, BlockPermissions unshared)
    {
        try
        {
            Apply(perm, unshared, unlock: true);
        }
        catch (BlockException)
        {
        }
    }

    private void Apply(BlockPermissions perm, BlockPermissions unshared, bool unlock)
    {
        for (var bit = 0; bit < BlockPermissionNames.Count; bit++)
        {
            var p = (BlockPermissions)(1 << bit);
            Toggle(ref _lockedPerm, p, (perm & p) != 0, unlock, PermBase + bit);
        }
        for (var bit = 0; bit < BlockPermissionNames.Count; bit++)
        {
            var p = (BlockPermissions)(1 << bit);
            Toggle(ref _lockedUnshared, p, (unshared & p) != 0, unlock, SharedBase + bit);
        }
    }

    private void Toggle(ref BlockPermissions locked, BlockPermissions p, bool want, bool unlock, int offset)
    {
        if (want && (locked & p) == 0)
        {
            var err = LibC.SetOfdLock(handle, LibC.F_RDLCK, offset, 1);
            if (err != 0)
            {
                throw new ImageLockException(WithErrno($"Failed to lock byte {offset}", err), filename);
            }
            locked |= p;
        }
        else if (!want && unlock && (locked & p) != 0)
        {
            var err = LibC.SetOfdLock(handle, LibC.F_UNLCK, offset, 1);
            if (err != 0)
            {
                throw new ImageLockException($"Failed to unlock byte {offset}: {LibC.Describe(err)}", filename);
            }
            locked &= ~p;
        }
    }

    /// <summary>QEMU's raw_check_lock_bytes: would an exclusive lock on the conflicting bytes succeed?</summary>
    private void Check(BlockPermissions perm, BlockPermissions shared)
    {
        for (var bit = 0; bit < BlockPermissionNames.Count; bit++)
        {
            var p = (BlockPermissions)(1 << bit);
            if ((perm & p) != 0 && LibC.TestOfdLock(handle, LibC.F_WRLCK, SharedBase + bit, 1) is var err and not 0)
            {
                throw new ImageLockException(WithErrno($"Failed to get \"{p.Describe()}\" lock", err), filename);
            }
        }
        for (var bit = 0; bit < BlockPermissionNames.Count; bit++)
        {
            var p = (BlockPermissions)(1 << bit);
            if ((shared & p) == 0 && LibC.TestOfdLock(handle, LibC.F_WRLCK, PermBase + bit, 1) is var err and not 0)
            {
                throw new ImageLockException(WithErrno($"Failed to get shared \"{p.Describe()}\" lock", err), filename);
            }
        }
    }

    /// <summary>A conflict (EAGAIN, EACCES) is worded alone; any other failure adds its errno text.</summary>
    private static string WithErrno(string message, int err) =>
        err is LibC.EAGAIN or LibC.EACCES ? message : $"{message}: {LibC.Describe(err)}";
}

/// <summary>An image lock that another open file is in the way of, with QEMU's hint naming the image.</summary>
public sealed class ImageLockException(string message, string filename) : BlockException(message)
{
    public string Filename { get; } = filename;

    public override string Hint => $"Is another process using the image [{Filename}]?";
}
