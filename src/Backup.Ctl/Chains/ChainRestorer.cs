using System.Security.Cryptography;
using Backup.Block;
using Backup.Block.Drivers.Qcow2;
using Backup.Ctl.Images;

namespace Backup.Ctl.Chains;

/// <summary>
/// <c>backupctl chain restore</c>: writes a drive as of one backup to a new raw or qcow2 image. Zero chunks are
/// left unwritten (sparse raw, unallocated qcow2). Every chunk is checked against the manifest's digest as it
/// is written, so a restore that completes is the content the backup recorded.
/// </summary>
public static class ChainRestorer
{
    public static async Task RestoreAsync(ChainFolder chain, Manifest backup, string drive, string to, string format,
        IProgress<long>? progress, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(chain);
        ArgumentNullException.ThrowIfNull(backup);
        var d = backup.Drive(drive) ?? throw new CtlException($"backup {backup.Sequence} has no drive '{drive}'");
        to = Path.GetFullPath(to);
        if (File.Exists(to))
        {
            throw new CtlException($"{to} exists already: restore writes a new image");
        }
        await using var source = await ImageChain.OpenAsync(chain.PathOf(d.Image), cancellationToken: cancellationToken).ConfigureAwait(false);
        var graph = BlockGraph.CreateDefault();
        try
        {
            await using (File.Create(to).ConfigureAwait(false))
            {
            }
            var file = await graph.AddAsync(new BlockOptions { ["driver"] = "file", ["node-name"] = "out-file", ["filename"] = to }, cancellationToken)
                .ConfigureAwait(false);
            BlockNode target;
            if (format == "qcow2")
            {
                await Qcow2Creator.CreateAsync(file, new Qcow2CreateOptions { Size = d.VirtualSize }, cancellationToken).ConfigureAwait(false);
                target = await graph.AddAsync(new BlockOptions { ["driver"] = "qcow2", ["node-name"] = "out", ["file"] = "out-file" }, cancellationToken)
                    .ConfigureAwait(false);
            }
            else
            {
                await file.TruncateAsync(d.VirtualSize, cancellationToken).ConfigureAwait(false);
                target = file;
            }
            var buffer = new byte[backup.ChunkSize];
            var index = 0;
            for (long offset = 0; offset < d.VirtualSize; offset += backup.ChunkSize, index++)
            {
                var n = (int)Math.Min(backup.ChunkSize, d.VirtualSize - offset);
                var chunk = buffer.AsMemory(0, n);
                await source.Top.ReadAsync(offset, chunk, cancellationToken).ConfigureAwait(false);
                if (Convert.ToHexStringLower(SHA256.HashData(chunk.Span)) != d.Sha256[index])
                {
                    throw new CtlException($"{d.Image}: content at offset {offset} differs from the digest recorded at backup time; "
                        + "run 'backupctl chain verify' (the partial restore was removed)");
                }
                if (chunk.Span.ContainsAnyExcept((byte)0))
                {
                    await target.WriteAsync(offset, chunk, WriteFlags.None, cancellationToken).ConfigureAwait(false);
                }
                progress?.Report(offset + n);
            }
            await target.FlushAsync(cancellationToken).ConfigureAwait(false);
            await graph.CloseAllAsync().ConfigureAwait(false);
        }
        catch
        {
            await graph.CloseAllAsync().ConfigureAwait(false);
            File.Delete(to);
            throw;
        }
    }
}
