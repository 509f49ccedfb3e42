using Backup.Block;
using Backup.Block.Drivers.Qcow2;

namespace Backup.Ctl.Images;

/// <summary>
/// A backup image opened in-process, read-only, through the block layer: the qcow2 driver checks the header
/// and follows the backing files named in it, exactly as the daemon would. Nothing is written to the files.
/// </summary>
public sealed class ImageChain : IAsyncDisposable
{
    private readonly BlockGraph _graph;

    private ImageChain(BlockGraph graph, BlockNode top)
    {
        _graph = graph;
        Top = top;
    }

    /// <summary>The image asked for; reads through it see the whole chain's guest-visible content.</summary>
    public BlockNode Top { get; }

    /// <summary>Virtual size in bytes.</summary>
    public long Size => Top.Length;

    /// <summary>The layers from the top down (the image itself, its backing file, ...), as host file names.</summary>
    public IReadOnlyList<string> Layers
    {
        get
        {
            var layers = new List<string>();
            for (var n = Top; n is not null; n = (n as Qcow2Node)?.Backing)
            {
                layers.Add(n.Filename);
            }
            return layers;
        }
    }

    /// <summary>Opens <paramref name="path"/> read-only (qcow2, or raw for anything that is not qcow2).</summary>
    public static async Task<ImageChain> OpenAsync(string path, bool readOnly = true, CancellationToken cancellationToken = default)
    {
        var full = Path.GetFullPath(path);
        if (!File.Exists(full))
        {
            throw new CtlException($"{path}: no such file");
        }
        var graph = BlockGraph.CreateDefault();
        try
        {
            var node = await graph.AddAsync(new BlockOptions
            {
                ["driver"] = await IsQcow2Async(full, cancellationToken).ConfigureAwait(false) ? "qcow2" : "raw",
                ["node-name"] = "image",
                ["read-only"] = readOnly,
                ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = full, ["read-only"] = readOnly },
            }, cancellationToken).ConfigureAwait(false);
            return new ImageChain(graph, node);
        }
        catch (BlockException e)
        {
            await graph.CloseAllAsync().ConfigureAwait(false);
            throw new CtlException($"{path}: {e.Message}");
        }
    }

    private static async Task<bool> IsQcow2Async(string path, CancellationToken cancellationToken)
    {
        var magic = new byte[4];
        await using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite, 4096, useAsync: true);
        var n = await f.ReadAtLeastAsync(magic, 4, throwOnEndOfStream: false, cancellationToken).ConfigureAwait(false);
        return n == 4 && magic is [(byte)'Q', (byte)'F', (byte)'I', 0xfb];
    }

    /// <summary>
    /// The host file that supplies the guest data at <paramref name="offset"/>: the topmost layer that allocates
    /// it, or null when no layer does (it reads as zeros).
    /// </summary>
    public async Task<string?> LayerAtAsync(long offset, CancellationToken cancellationToken = default)
    {
        for (var n = Top; n is not null; n = (n as Qcow2Node)?.Backing)
        {
            if (n is not Qcow2Node)
            {
                return n.Filename;
            }
            var status = await n.GetBlockStatusAsync(offset, 1, cancellationToken).ConfigureAwait(false);
            if (status.IsAllocated)
            {
                return n.Filename;
            }
        }
        return null;
    }

    public async ValueTask DisposeAsync() => await _graph.CloseAllAsync().ConfigureAwait(false);
}
