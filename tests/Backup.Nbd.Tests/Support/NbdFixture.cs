using Backup.Block;
using Backup.Nbd.Exports;
using Backup.Nbd.Server;

namespace Backup.Nbd.Tests.Support;

/// <summary>
/// A block graph with raw nodes over temp files and an NBD server on a temp Unix socket, in-process.
/// </summary>
internal sealed class NbdFixture : IAsyncDisposable
{
    private int _nodes;

    private NbdFixture(string dir)
    {
        Dir = dir;
        SocketPath = Path.Combine(dir, "nbd.sock");
        Server = new NbdServer(Graph, Events);
    }

    public string Dir { get; }
    public string SocketPath { get; }
    public BlockGraph Graph { get; } = new([.. BuiltinDrivers.All, new MemoryDriver()]);
    public TestEvents Events { get; } = new();
    public NbdServer Server { get; }

    public static NbdFixture Create(bool start = true)
    {
        // Unix socket paths are limited to 108 bytes: keep the directory short.
        var dir = Path.Combine("/tmp", "nbdt-" + Guid.NewGuid().ToString("N")[..10]);
        Directory.CreateDirectory(dir);
        var f = new NbdFixture(dir);
        if (start)
        {
            f.Server.Start(new NbdUnixAddress(f.SocketPath));
        }
        return f;
    }

    public string Uri(string export) => $"nbd+unix:///{export}?socket={SocketPath}";

    /// <summary>A sparse file of <paramref name="size"/> bytes, opened as raw node <paramref name="nodeName"/>.</summary>
    public async Task<(BlockNode Node, string File)> AddRawNodeAsync(string nodeName, long size, bool readOnly = false, string? discard = null,
        Action<FileStream>? fill = null)
    {
        var file = Path.Combine(Dir, $"{nodeName}-{Interlocked.Increment(ref _nodes)}.img");
        await using (var fs = new FileStream(file, FileMode.CreateNew))
        {
            fs.SetLength(size);
            fill?.Invoke(fs);
        }
        var opts = new BlockOptions
        {
            ["driver"] = "raw",
            ["node-name"] = nodeName,
            ["read-only"] = readOnly,
            ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = file },
        };
        if (discard is not null)
        {
            opts["discard"] = discard;
        }
        var node = await Graph.AddAsync(opts);
        return (node, file);
    }

    public async Task<MemoryNode> AddMemoryNodeAsync(string nodeName, int size, bool readOnly = false) =>
        (MemoryNode)await Graph.AddAsync(new BlockOptions
        {
            ["driver"] = "memory",
            ["node-name"] = nodeName,
            ["size"] = (long)size,
            ["read-only"] = readOnly,
        });

    public Task<NbdTestClient> ConnectAsync() => NbdTestClient.ConnectAsync(SocketPath);

    public NbdExport Export(string id, string nodeName, bool writable = false, string? name = null, string? description = null,
        bool allocationDepth = false) =>
        Server.AddExport(new NbdExportOptions
        {
            Id = id,
            NodeName = nodeName,
            Name = name,
            Writable = writable,
            Description = description,
            AllocationDepth = allocationDepth,
        });

    public async ValueTask DisposeAsync()
    {
        await Server.DisposeAsync();
        await Graph.CloseAllAsync();
        try
        {
            Directory.Delete(Dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
