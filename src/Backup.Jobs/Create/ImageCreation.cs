using Backup.Block;
using Backup.Block.Drivers.File;
using Backup.Block.Drivers.Qcow2;

namespace Backup.Jobs.Create;

/// <summary>What blockdev-create was asked to make (BlockdevCreateOptions, bound); run by a <see cref="CreateJob"/>.</summary>
public abstract class ImageCreation
{
    public abstract Task RunAsync(CancellationToken cancellationToken);

    /// <summary>What is made, for the log.</summary>
    public abstract string Description { get; }
}

/// <summary>A creation that can only fail (an option this daemon does not implement); the error is the job's.</summary>
public sealed class FailedCreation(string message) : ImageCreation
{
    public override Task RunAsync(CancellationToken cancellationToken) => Task.FromException(new BlockException(message));

    public override string Description => "nothing: " + message;
}

/// <summary>Driver <c>file</c>: a host file of the given size.</summary>
public sealed class FileCreation(FileCreateOptions options) : ImageCreation
{
    public override Task RunAsync(CancellationToken cancellationToken) => FileCreator.CreateAsync(options, cancellationToken);

    public override string Description => $"file {options.Filename}, {options.Size} bytes";
}

/// <summary>
/// Driver <c>qcow2</c> on an existing node (<c>file</c>) and optionally an external data file, each
/// given by node name or as options for a node opened for the creation only. Nodes are looked up and
/// checked when the job runs, so errors land in the job as in QEMU.
/// </summary>
public sealed class Qcow2Creation(BlockGraph graph, BlockRef file, BlockRef? dataFile, Qcow2CreateOptions options) : ImageCreation
{
    public override string Description => $"qcow2 image on {(file.NodeName is { } n ? "node " + n : "a new node")}";

    public override async Task RunAsync(CancellationToken cancellationToken)
    {
        var opened = new List<BlockNode>();
        var uses = new List<IDisposable>();
        try
        {
            var fileNode = await ResolveAsync(file, opened, cancellationToken).ConfigureAwait(false);
            Qcow2Creator.Validate(options, hasDataFile: dataFile is not null);
            var dataNode = dataFile is null ? null : await ResolveAsync(dataFile, opened, cancellationToken).ConfigureAwait(false);
            CheckExclusiveWriter(graph, fileNode);
            if (dataNode is not null)
            {
                CheckExclusiveWriter(graph, dataNode);
            }
            // Keep the nodes from being deleted while the image is written.
            uses.Add(fileNode.AddUser("block device is in use by job: create"));
            if (dataNode is not null)
            {
                uses.Add(dataNode.AddUser("block device is in use by job: create"));
            }
            await Qcow2Creator.CreateAsync(fileNode, options with { DataFile = dataNode }, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            foreach (var u in uses)
            {
                u.Dispose();
            }
            foreach (var n in opened)
            {
                await graph.ReleaseAsync(n).ConfigureAwait(false);
            }
        }
    }

    private async Task<BlockNode> ResolveAsync(BlockRef reference, List<BlockNode> opened, CancellationToken cancellationToken)
    {
        if (reference.NodeName is { } name)
        {
            return graph.Get(name);
        }
        var node = await graph.OpenOwnedAsync(reference.Definition!, cancellationToken).ConfigureAwait(false);
        opened.Add(node);
        return node;
    }

    /// <summary>
    /// QEMU's permission check: creation needs write and resize and shares neither, so a read-only node
    /// or one that another node already uses as a child (e.g. the file of an open qcow2 node) is refused
    /// with QEMU's words.
    /// </summary>
    private static void CheckExclusiveWriter(BlockGraph graph, BlockNode node)
    {
        if (node.ReadOnly)
        {
            throw new BlockException("Block node is read-only");
        }
        if (graph.ParentsOf(node) is [var parent, ..])
        {
            var role = parent.Children.FirstOrDefault(c => ReferenceEquals(c.Node, node))?.Role ?? "file";
            throw new BlockException($"Permission conflict on node '{node.NodeName}': permissions 'write, resize' are both " +
                $"required by an unnamed block device (uses node '{node.NodeName}' as 'root' child) and unshared by node " +
                $"'{parent.NodeName}' (uses node '{node.NodeName}' as '{role}' child).");
        }
    }
}

/// <summary>A BlockdevRef: the name of an existing node, or options for a new one.</summary>
public sealed record BlockRef(string? NodeName, BlockOptions? Definition);
