using System.Buffers;
using System.Security.Cryptography;
using Backup.Block;

namespace Backup.Ctl.Images;

/// <summary>
/// SHA-256 of each fixed-size chunk of an image's guest-visible content (the last chunk may be short), the
/// digests a manifest keeps and verify compares. Chunks that the chain does not allocate read as zeros and are
/// hashed as such, so the digests depend only on what the guest would read.
/// </summary>
public static class ContentDigest
{
    /// <summary>4 MiB: a 1 TiB disk has 262144 digests (17 MiB of manifest), a difference is placed to 4 MiB.</summary>
    public const int DefaultChunkSize = 4 << 20;

    public static async Task<List<string>> ComputeAsync(BlockNode node, int chunkSize, IProgress<long>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(node);
        var digests = new List<string>((int)((node.Length + chunkSize - 1) / chunkSize));
        var buffer = ArrayPool<byte>.Shared.Rent(chunkSize);
        try
        {
            for (long offset = 0; offset < node.Length; offset += chunkSize)
            {
                var n = (int)Math.Min(chunkSize, node.Length - offset);
                var chunk = buffer.AsMemory(0, n);
                await node.ReadAsync(offset, chunk, cancellationToken).ConfigureAwait(false);
                digests.Add(Convert.ToHexStringLower(SHA256.HashData(chunk.Span)));
                progress?.Report(offset + n);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return digests;
    }
}
