using System.Buffers;
using Backup.Block.Drivers.File;
using Backup.Block.Tests.Qcow2;

namespace Backup.Block.Tests.Files;

/// <summary>The file node's FUA writes (pwritev2 RWF_DSYNC) and the file creator (blockdev-create driver 'file').</summary>
public sealed class FileNodeTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Fua_writes_land_where_asked_from_arrays_and_from_other_memory(bool direct)
    {
        var path = _dir.File("f.img");
        await System.IO.File.WriteAllBytesAsync(path, new byte[1 << 20]);
        var data = new byte[10_000];
        new Random(5).NextBytes(data);
        var graph = BlockGraph.CreateDefault();
        try
        {
            var node = await graph.AddAsync(new BlockOptions
            {
                ["driver"] = "file", ["node-name"] = "f", ["filename"] = path, ["cache"] = new BlockOptions { ["direct"] = direct },
            });
            // An array slice (pinned as is) and memory that is not an array (copied to a rented buffer).
            await node.WriteAsync(4096, data.AsMemory(100, 8192), WriteFlags.Fua);
            using var owner = new NativeMemoryOwner(data.AsSpan(0, 4096));
            await node.WriteAsync((1 << 20) - 4096, owner.Memory, WriteFlags.Fua);
            // Past the end: the file grows.
            await node.WriteAsync(1 << 20, data.AsMemory(0, 4096), WriteFlags.Fua);
            node.Length.Should().Be((1 << 20) + 4096);
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        var bytes = await System.IO.File.ReadAllBytesAsync(path);
        bytes.AsSpan(4096, 8192).ToArray().Should().Equal(data.AsSpan(100, 8192).ToArray());
        bytes.AsSpan((1 << 20) - 4096, 4096).ToArray().Should().Equal(data.AsSpan(0, 4096).ToArray());
        bytes.AsSpan(1 << 20, 4096).ToArray().Should().Equal(data.AsSpan(0, 4096).ToArray());
        bytes.AsSpan(0, 4096).ToArray().Should().AllBeEquivalentTo((byte)0);
    }

    [Fact]
    public async Task Creator_empties_and_sizes_and_reports_qemu_errors()
    {
        var path = _dir.File("c.img");
        await System.IO.File.WriteAllBytesAsync(path, Enumerable.Repeat((byte)0xff, 8192).ToArray());
        await FileCreator.CreateAsync(new FileCreateOptions(path, 1 << 20));
        var bytes = await System.IO.File.ReadAllBytesAsync(path);
        bytes.Length.Should().Be(1 << 20);
        bytes.Should().AllBeEquivalentTo((byte)0, "an existing file loses its content, as with QEMU");

        await FileCreator.CreateAsync(new FileCreateOptions(path, 65536, Preallocation.Full));
        new FileInfo(path).Length.Should().Be(65536);
        await FileCreator.CreateAsync(new FileCreateOptions(path, 65536, Preallocation.Falloc));
        new FileInfo(path).Length.Should().Be(65536);

        var bad = async () => await FileCreator.CreateAsync(new FileCreateOptions(path, -1));
        (await bad.Should().ThrowAsync<BlockException>()).Which.Message.Should().Be("Could not resize file: Invalid argument");
        var meta = async () => await FileCreator.CreateAsync(new FileCreateOptions(path, 0, Preallocation.Metadata));
        (await meta.Should().ThrowAsync<BlockException>()).Which.Message.Should().Be("Unsupported preallocation mode: metadata");
        var dir = async () => await FileCreator.CreateAsync(new FileCreateOptions(_dir.Path, 0));
        (await dir.Should().ThrowAsync<BlockException>()).Which.Message.Should().Be($"Could not create '{_dir.Path}': Is a directory");
    }

    /// <summary>Memory that is not backed by a managed array, so the FUA path must copy it.</summary>
    private sealed class NativeMemoryOwner : MemoryManager<byte>
    {
        private readonly byte[] _copy;

        public NativeMemoryOwner(ReadOnlySpan<byte> content) => _copy = content.ToArray();

        public override Span<byte> GetSpan() => _copy;

        public override MemoryHandle Pin(int elementIndex = 0) => throw new NotSupportedException();

        public override void Unpin() { }

        protected override void Dispose(bool disposing) { }

        protected override bool TryGetArray(out ArraySegment<byte> segment)
        {
            segment = default;
            return false;
        }
    }
}
