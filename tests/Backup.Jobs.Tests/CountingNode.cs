using System.Diagnostics;
using Backup.Block;

namespace Backup.Jobs.Tests;

/// <summary>
/// A pass-through node over a real node that counts what reaches it: bytes read, block-status calls,
/// data writes and write-zeroes. Put over a source it shows what a backup reads; over a target, what it writes.
/// </summary>
internal sealed class CountingNode(BlockNode inner, string name)
    : BlockNode(new NodeContext { NodeName = name, Graph = BlockGraph.CreateDefault(), Options = [] })
{
    private long _bytesRead;
    private long _bytesWritten;
    private int _statusCalls;
    private int _zeroWrites;

    public BlockNode Inner => inner;

    public long BytesRead => Interlocked.Read(ref _bytesRead);

    public long BytesWritten => Interlocked.Read(ref _bytesWritten);

    public int StatusCalls => Volatile.Read(ref _statusCalls);

    public int ZeroWrites => Volatile.Read(ref _zeroWrites);

    /// <summary>The inner node's children, so that a target's backing node shows through.</summary>
    public override IReadOnlyList<BlockChild> Children => inner.Children;

    public override string DriverName => inner.DriverName;

    public override long Length => inner.Length;

    public override string Filename => inner.Filename;

    protected override ValueTask ReadCoreAsync(long offset, Memory<byte> buffer, CancellationToken cancellationToken)
    {
        Interlocked.Add(ref _bytesRead, buffer.Length);
        return inner.ReadAsync(offset, buffer, cancellationToken);
    }

    protected override ValueTask WriteCoreAsync(long offset, ReadOnlyMemory<byte> data, WriteFlags flags, CancellationToken cancellationToken)
    {
        Interlocked.Add(ref _bytesWritten, data.Length);
        return inner.WriteAsync(offset, data, flags, cancellationToken);
    }

    protected override ValueTask WriteZeroesCoreAsync(long offset, long length, WriteFlags flags, CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref _zeroWrites);
        return inner.WriteZeroesAsync(offset, length, flags, cancellationToken);
    }

    protected override ValueTask DiscardCoreAsync(long offset, long length, CancellationToken cancellationToken) =>
        inner.DiscardAsync(offset, length, cancellationToken);

    protected override ValueTask FlushCoreAsync(CancellationToken cancellationToken) => inner.FlushAsync(cancellationToken);

    protected override ValueTask<BlockStatus> GetBlockStatusCoreAsync(long offset, long length, CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref _statusCalls);
        return inner.GetBlockStatusAsync(offset, length, cancellationToken);
    }

    public override ImageInfo GetImageInfo() => inner.GetImageInfo();

    public override ValueTask CloseAsync() => ValueTask.CompletedTask;
}

/// <summary>Real qcow2 images made with qemu-img and qemu-io, opened in a graph of their own.</summary>
internal sealed class Qcow2Images : IAsyncDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("sparse-jobs-").FullName;
    private readonly BlockGraph _graph = BlockGraph.CreateDefault();
    private int _nodes;

    public string PathOf(string name) => Path.Combine(_dir, name);

    /// <summary>Creates NAME.qcow2 (optionally over a backing image) and runs qemu-io commands on it.</summary>
    public string Create(string name, long size, string? backing = null, params string[] io)
    {
        var path = PathOf(name);
        if (backing is null)
        {
            Tool("qemu-img", "create", "-q", "-f", "qcow2", path, size.ToString(System.Globalization.CultureInfo.InvariantCulture));
        }
        else
        {
            Tool("qemu-img", "create", "-q", "-f", "qcow2", "-b", PathOf(backing), "-F", "qcow2", path);
        }
        if (io.Length > 0)
        {
            var args = new List<string> { "-f", "qcow2", path };
            foreach (var c in io)
            {
                args.Add("-c");
                args.Add(c);
            }
            Tool("qemu-io", [.. args]);
        }
        return path;
    }

    public async Task<BlockNode> OpenAsync(string name) =>
        await _graph.AddAsync(new BlockOptions
        {
            ["driver"] = "qcow2",
            ["node-name"] = $"n{++_nodes}",
            ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = PathOf(name) },
        });

    /// <summary>Closes every node (flushing the images) so that qemu-img sees them.</summary>
    public async Task CloseAsync() => await _graph.CloseAllAsync();

    public static string Tool(string tool, params string[] args)
    {
        var psi = new ProcessStartInfo(tool) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi) ?? throw new InvalidOperationException($"{tool} did not start");
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(60000))
        {
            p.Kill();
            throw new TimeoutException($"{tool} {string.Join(' ', args)} timed out");
        }
        if (p.ExitCode != 0)
        {
            throw new InvalidOperationException($"{tool} {string.Join(' ', args)} failed ({p.ExitCode}): {stdout.Result}{stderr.Result}");
        }
        return stdout.Result;
    }

    public async ValueTask DisposeAsync()
    {
        await _graph.CloseAllAsync();
        Directory.Delete(_dir, recursive: true);
    }
}
