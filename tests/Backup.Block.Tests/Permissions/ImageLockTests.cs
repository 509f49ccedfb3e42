using Backup.Block.Drivers.File;
using Backup.Block.Permissions;
using Backup.Block.Tests.Qcow2;

namespace Backup.Block.Tests.Permissions;

/// <summary>
/// The graph's conflict check and the file driver's lock bytes. Two file nodes on one image are two open
/// file descriptions, so their OFD locks exclude each other inside one process as across processes.
/// Expected texts are QSD 7.2's for the same graphs.
/// </summary>
public sealed class ImageLockTests : IDisposable
{
    private readonly TempDir _dir = new();
    private readonly BlockGraph _graph = BlockGraph.CreateDefault();

    public void Dispose()
    {
        _graph.CloseAllAsync().AsTask().GetAwaiter().GetResult();
        _dir.Dispose();
    }

    private string Image(string name = "d.qcow2")
    {
        var path = _dir.File(name);
        if (!System.IO.File.Exists(path))
        {
            QemuTools.Img("create", "-q", "-f", name.EndsWith(".qcow2", StringComparison.Ordinal) ? "qcow2" : "raw", path, "64M");
        }
        return path;
    }

    private Task<BlockNode> AddAsync(string driver, string nodeName, object file, bool readOnly = false, string? locking = null)
    {
        var options = new BlockOptions { ["driver"] = driver, ["node-name"] = nodeName, ["read-only"] = readOnly };
        if (driver == "file")
        {
            options["filename"] = file;
            if (locking is not null)
            {
                options["locking"] = locking;
            }
        }
        else
        {
            options["file"] = file;
        }
        return _graph.AddAsync(options).AsTask();
    }

    /// <summary>The lock bytes held on a file, from /proc/locks (OFD locks only).</summary>

    [Fact]
    public async Task A_read_write_qcow2_takes_qemus_bytes_and_gives_them_back_when_deleted()
    {
        var path = Image();
        var file = (FileNode)await AddAsync("file", "f", path);
        file.Locking.Should().BeTrue();
        ProcLocks.Bytes(path).Should().BeEmpty("a node nobody uses takes nothing");
        await AddAsync("qcow2", "d", "f");
        file.LockBytes.Should().Be((BlockPermissions.ConsistentRead | BlockPermissions.Write | BlockPermissions.Resize,
            BlockPermissions.Write | BlockPermissions.Resize));
        ProcLocks.Bytes(path).Should().Equal(100, 101, 103, 201, 203);
        await _graph.RemoveAsync("d");
        ProcLocks.Bytes(path).Should().BeEmpty();
    }

    [Fact]
    public async Task Two_formats_on_one_file_node_conflict_in_qemus_words()
    {
        await AddAsync("file", "f", Image());
        await AddAsync("qcow2", "d", "f");
        var act = () => AddAsync("qcow2", "d2", "f");
        (await act.Should().ThrowAsync<PermissionConflictException>()).WithMessage(
            "Permission conflict on node 'f': permissions 'write, resize' are both required by node 'd' (uses node 'f' as 'file' child) " +
            "and unshared by node 'd2' (uses node 'f' as 'file' child).");
        _graph.Find("d2").Should().BeNull();
        _graph.UsesOf(_graph.Get("f")).Should().ContainSingle();
    }

    [Fact]
    public async Task An_export_that_writes_conflicts_with_a_format_on_the_same_node()
    {
        var f = await AddAsync("file", "f", Image());
        using (_graph.AttachUser(f, ExternalUse.NbdExport(writable: true)))
        {
            var act = () => AddAsync("qcow2", "d", "f");
            (await act.Should().ThrowAsync<PermissionConflictException>()).WithMessage(
                "Permission conflict on node 'f': permissions 'write' are both required by an unnamed block device (uses node 'f' as 'root' child) " +
                "and unshared by node 'd' (uses node 'f' as 'file' child).");
        }
        await AddAsync("qcow2", "d", "f");
        var ro = () => _graph.AttachUser(f, ExternalUse.NbdExport(writable: false));
        ro.Should().Throw<PermissionConflictException>().WithMessage(
            "Permission conflict on node 'f': permissions 'resize' are both required by node 'd' (uses node 'f' as 'file' child) " +
            "and unshared by an unnamed block device (uses node 'f' as 'root' child).");
    }

    [Fact]
    public async Task Two_file_nodes_on_one_image_exclude_each_other_through_the_lock_bytes()
    {
        var path = Image();
        await AddAsync("file", "f1", path, readOnly: true);
        await AddAsync("qcow2", "d1", "f1", readOnly: true);
        await AddAsync("file", "f2", path);
        var act = () => AddAsync("qcow2", "d2", "f2");
        var e = (await act.Should().ThrowAsync<ImageLockException>()).Which;
        e.Message.Should().Be("Failed to get \"write\" lock");
        e.Hint.Should().Be($"Is another process using the image [{path}]?");
        ProcLocks.Bytes(path).Should().Equal(100, 201, 203);

        // A read-only second user is fine; f2 is back to holding nothing, so the read-only one took the bytes.
        await AddAsync("qcow2", "d3", "f2", readOnly: true);
        await _graph.RemoveAsync("d1");
        await _graph.RemoveAsync("f1");
        await _graph.RemoveAsync("d3");
        await AddAsync("qcow2", "d2", "f2");
        ProcLocks.Bytes(path).Should().Equal(100, 101, 103, 201, 203);
    }

    [Fact]
    public async Task Read_only_users_refuse_writers_in_qemus_words()
    {
        var path = Image();
        await AddAsync("file", "f1", path);
        await AddAsync("qcow2", "d1", "f1");
        await AddAsync("file", "f2", path, readOnly: true);
        var act = () => AddAsync("qcow2", "d2", "f2", readOnly: true);
        (await act.Should().ThrowAsync<ImageLockException>()).WithMessage("Failed to get shared \"write\" lock");
    }

    [Fact]
    public async Task Locking_off_takes_no_bytes_and_checks_nothing()
    {
        var path = Image();
        await AddAsync("file", "f1", path);
        await AddAsync("qcow2", "d1", "f1");
        var f2 = (FileNode)await AddAsync("file", "f2", path, locking: "off");
        f2.Locking.Should().BeFalse();
        await AddAsync("qcow2", "d2", "f2");
        ProcLocks.Bytes(path).Should().Equal(100, 101, 103, 201, 203);
    }
}
