using System.Buffers;
using Backup.Block.Posix;
using Microsoft.Win32.SafeHandles;

namespace Backup.Block.Drivers.File;

/// <summary>How the bytes of a new image are reserved (QEMU's PreallocMode).</summary>
public enum Preallocation
{
    /// <summary>Nothing: a sparse file, or for qcow2 only the header tables.</summary>
    Off,
    /// <summary>qcow2: every guest cluster mapped to a host cluster; the file grows sparse over them.</summary>
    Metadata,
    /// <summary>Blocks reserved with fallocate(2), not written.</summary>
    Falloc,
    /// <summary>Blocks written with zeros.</summary>
    Full,
}

/// <summary>What a new host file looks like (QEMU's BlockdevCreateOptionsFile).</summary>
public sealed record FileCreateOptions(string Filename, long Size, Preallocation Preallocation = Preallocation.Off);

/// <summary>
/// blockdev-create for driver <c>file</c>: creates the file (or opens an existing one), empties it and
/// sizes it, as QEMU's file-posix does — an existing file loses its content.
/// </summary>
public static class FileCreator
{
    private const int ZeroChunk = 1 << 20;

    public static async Task CreateAsync(FileCreateOptions options, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.Preallocation == Preallocation.Metadata)
        {
            // QEMU's wording for a mode the file driver does not have.
            throw new BlockException("Unsupported preallocation mode: metadata");
        }
        if (Directory.Exists(options.Filename))
        {
            throw new BlockException($"Could not create '{options.Filename}': {LibC.Describe(LibC.EISDIR)}");
        }
        SafeFileHandle handle;
        try
        {
            handle = System.IO.File.OpenHandle(options.Filename, FileMode.OpenOrCreate, FileAccess.ReadWrite,
                FileShare.ReadWrite | FileShare.Delete, FileOptions.Asynchronous);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Could not create '{options.Filename}': {LibC.Describe(LibC.ErrnoOf(e))}", e);
        }
        using (handle)
        {
            // Clear first, so that no old data shows through the new image.
            Resize(handle, 0, "Could not clear file");
            if (options.Size < 0)
            {
                throw new BlockException($"Could not resize file: {LibC.Describe(LibC.EINVAL)}");
            }
            switch (options.Preallocation)
            {
                case Preallocation.Falloc:
                    var err = LibC.Fallocate(handle, 0, 0, options.Size);
                    if (err != 0 && options.Size > 0)
                    {
                        throw new BlockException($"Could not preallocate data for the new file: {LibC.Describe(err)}");
                    }
                    break;
                case Preallocation.Full:
                    await WriteZerosAsync(handle, options.Size, cancellationToken).ConfigureAwait(false);
                    break;
                default:
                    Resize(handle, options.Size, "Could not resize file");
                    break;
            }
            RandomAccess.FlushToDisk(handle);
        }
    }

    private static void Resize(SafeFileHandle handle, long size, string what)
    {
        try
        {
            RandomAccess.SetLength(handle, size);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
        {
            throw new BlockException($"{what}: {LibC.Describe(LibC.ErrnoOf(e))}", e);
        }
    }

    private static async Task WriteZerosAsync(SafeFileHandle handle, long size, CancellationToken cancellationToken)
    {
        var zeros = ArrayPool<byte>.Shared.Rent(ZeroChunk);
        try
        {
            Array.Clear(zeros, 0, ZeroChunk);
            for (long offset = 0; offset < size; offset += ZeroChunk)
            {
                var n = (int)Math.Min(ZeroChunk, size - offset);
                try
                {
                    await RandomAccess.WriteAsync(handle, zeros.AsMemory(0, n), offset, cancellationToken).ConfigureAwait(false);
                }
                catch (IOException e)
                {
                    throw new BlockException($"Could not write zeros for preallocation: {LibC.Describe(LibC.ErrnoOf(e))}", e);
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(zeros);
        }
    }
}
