using System.Globalization;
using System.Security.Cryptography;
using Backup.Ctl.Images;

namespace Backup.Ctl.Chains;

/// <summary>One problem verify found, named by image and, for content, by offset.</summary>
/// <param name="Sequence">The backup it was found in.</param>
/// <param name="Drive">The drive.</param>
/// <param name="Image">The image at fault (file name in the chain folder), as far as it can be told.</param>
/// <param name="Offset">The guest offset of the first differing chunk, for content differences.</param>
/// <param name="Problem">What is wrong.</param>
public sealed record ChainProblem(int Sequence, string Drive, string Image, long? Offset, string Problem)
{
    public override string ToString() => Offset is { } o
        ? string.Create(CultureInfo.InvariantCulture, $"backup {Sequence}, {Drive}: {Image} at offset {o} (0x{o:x}): {Problem}")
        : string.Create(CultureInfo.InvariantCulture, $"backup {Sequence}, {Drive}: {Image}: {Problem}");
}

/// <summary>
/// <c>backupctl chain verify</c>: for every backup of every drive, the images exist and open (the qcow2
/// driver checks each header, its tables and the backing file it names), the backing links are the chain the
/// manifest records, no image is marked corrupt or dirty, the virtual size is right, and every chunk of the
/// guest-visible content has the digest the manifest recorded when the backup was made.
/// </summary>
public static class ChainVerifier
{
    public static async Task<List<ChainProblem>> VerifyAsync(ChainFolder chain, Action<string>? progress, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(chain);
        var problems = new List<ChainProblem>();
        foreach (var m in chain.Backups)
        {
            foreach (var d in m.Drives)
            {
                progress?.Invoke($"backup {m.Sequence} ({m.Kind}), {d.Drive}: {d.Image}");
                problems.AddRange(await VerifyDriveAsync(chain, m, d, cancellationToken).ConfigureAwait(false));
            }
        }
        return problems;
    }

    private static async Task<List<ChainProblem>> VerifyDriveAsync(ChainFolder chain, Manifest m, ManifestDrive d, CancellationToken cancellationToken)
    {
        ChainProblem Problem(string image, string what, long? offset = null) => new(m.Sequence, d.Drive, image, offset, what);
        var missing = d.Chain.Where(i => !File.Exists(chain.PathOf(i))).ToList();
        if (missing.Count > 0)
        {
            return missing.Select(i => Problem(i, "missing")).ToList();
        }
        ImageChain image;
        try
        {
            image = await ImageChain.OpenAsync(chain.PathOf(d.Image), cancellationToken: cancellationToken).ConfigureAwait(false);
        }
        catch (CtlException e)
        {
            return [Problem(d.Image, "does not open: " + e.Message)];
        }
        await using (image.ConfigureAwait(false))
        {
            var problems = new List<ChainProblem>();
            var expected = d.Chain.Reverse().Select(chain.PathOf).ToList();
            var actual = image.Layers;
            if (!expected.SequenceEqual(actual))
            {
                problems.Add(Problem(d.Image, $"backing chain is {string.Join(" → ", actual.Select(Path.GetFileName))}, "
                    + $"the manifest says {string.Join(" → ", d.Chain.Reverse())}"));
                return problems;
            }
            for (var n = image.Top; n is not null; n = (n as Backup.Block.Drivers.Qcow2.Qcow2Node)?.Backing)
            {
                var info = n.GetImageInfo();
                var corrupt = info.FormatSpecific?.Data.FirstOrDefault(kv => kv.Key == "corrupt").Value as bool? ?? false;
                if (corrupt)
                {
                    problems.Add(Problem(Path.GetFileName(n.Filename), "the image is marked corrupt"));
                }
                if (info.DirtyFlag == true)
                {
                    problems.Add(Problem(Path.GetFileName(n.Filename), "the image is marked dirty (not closed cleanly)"));
                }
            }
            if (image.Size != d.VirtualSize)
            {
                problems.Add(Problem(d.Image, $"virtual size is {image.Size}, the manifest says {d.VirtualSize}"));
                return problems;
            }
            var difference = await FirstDifferenceAsync(image, m.ChunkSize, d.Sha256, cancellationToken).ConfigureAwait(false);
            if (difference is { } offset)
            {
                var layer = await image.LayerAtAsync(offset, cancellationToken).ConfigureAwait(false);
                problems.Add(Problem(layer is null ? d.Image : Path.GetFileName(layer), "content differs from the digest recorded at backup time", offset));
            }
            return problems;
        }
    }

    /// <summary>The offset of the first chunk whose digest differs, or null.</summary>
    private static async Task<long?> FirstDifferenceAsync(ImageChain image, int chunkSize, IReadOnlyList<string> digests, CancellationToken cancellationToken)
    {
        var buffer = new byte[chunkSize];
        var index = 0;
        for (long offset = 0; offset < image.Size; offset += chunkSize, index++)
        {
            var n = (int)Math.Min(chunkSize, image.Size - offset);
            await image.Top.ReadAsync(offset, buffer.AsMemory(0, n), cancellationToken).ConfigureAwait(false);
            if (index >= digests.Count || Convert.ToHexStringLower(SHA256.HashData(buffer.AsSpan(0, n))) != digests[index])
            {
                return await NarrowAsync(image, offset, n, cancellationToken).ConfigureAwait(false);
            }
        }
        return null;
    }

    /// <summary>
    /// A chunk digest says only that something in 4 MiB differs; the layer that holds the chunk's first allocated
    /// cluster is the likeliest culprit, so the offset reported is the chunk's, refined to its first allocated cluster.
    /// </summary>
    private static async Task<long> NarrowAsync(ImageChain image, long chunkOffset, int length, CancellationToken cancellationToken)
    {
        for (long o = chunkOffset; o < chunkOffset + length; o += 65536)
        {
            if (await image.LayerAtAsync(o, cancellationToken).ConfigureAwait(false) is not null)
            {
                return o;
            }
        }
        return chunkOffset;
    }
}
