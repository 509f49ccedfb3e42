using Backup.Block.Posix;
using Microsoft.Win32.SafeHandles;

namespace Backup.Block.Drivers.File;

/// <summary>The <c>file</c> protocol driver: a regular file (or block device) on the host.</summary>
public sealed class FileDriver : IBlockDriver
{
    public string Name => "file";

    public ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var filename = context.Options.GetString("filename")
            ?? throw new BlockException("Parameter 'filename' is missing");
        SafeFileHandle handle;
        try
        {
            handle = Open(filename, context.ReadOnly, context.CacheDirect);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Could not open '{filename}': {LibC.Describe(LibC.ErrnoOf(e))}", e);
        }
        if (Directory.Exists(filename))
        {
            handle.Dispose();
            throw new BlockException($"'{filename}' is not a regular file or block device");
        }
        bool locking;
        switch (context.Options.GetString("locking"))
        {
            case "off":
                locking = false;
                break;
            case "on":
                // QEMU falls back to process-wide POSIX locks without OFD; every Linux since 3.15 has them.
                locking = true;
                break;
            default:
                locking = FileLocks.Supported(handle);
                break;
        }
        return ValueTask.FromResult<BlockNode>(new FileNode(context, filename, handle, locking));
    }

    private static SafeFileHandle Open(string path, bool readOnly, bool direct)
    {
        if (direct)
        {
            return LibC.OpenHandle(path, (readOnly ? LibC.O_RDONLY : LibC.O_RDWR) | LibC.O_DIRECT);
        }
        return System.IO.File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite,
            FileShare.ReadWrite | FileShare.Delete, FileOptions.Asynchronous);
    }
}
