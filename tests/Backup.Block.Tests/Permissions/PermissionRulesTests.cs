using Backup.Block.Permissions;

namespace Backup.Block.Tests.Permissions;

/// <summary>
/// The permission arithmetic against what QSD 7.2 takes on disk (lock bytes read from /proc/locks while
/// it held these graphs): e.g. a read-write qcow2 with no users locks 100, 101, 103, 201, 203.
/// </summary>
public sealed class PermissionRulesTests
{
    private const BlockPermissions R = BlockPermissions.ConsistentRead;
    private const BlockPermissions W = BlockPermissions.Write;
    private const BlockPermissions WU = BlockPermissions.WriteUnchanged;
    private const BlockPermissions RS = BlockPermissions.Resize;
    private const BlockPermissions All = BlockPermissions.All;

    [Fact]
    public void A_writable_qcow2_takes_read_write_resize_on_its_file_and_shares_neither_write_nor_resize()
    {
        PermissionRules.ForChild(ChildKind.Storage, parentWritable: true, BlockPermissions.None, All)
            .Should().Be((R | W | RS, R | WU));
    }

    [Fact]
    public void A_read_only_qcow2_still_refuses_to_share_write_and_resize()
    {
        PermissionRules.ForChild(ChildKind.Storage, parentWritable: false, BlockPermissions.None, All)
            .Should().Be((R, R | WU));
    }

    [Fact]
    public void Raw_passes_its_users_through_and_takes_nothing_on_its_own()
    {
        PermissionRules.ForChild(ChildKind.RawFile, true, BlockPermissions.None, All).Should().Be((BlockPermissions.None, All));
        var export = ExternalUse.NbdExport(writable: true);
        PermissionRules.ForChild(ChildKind.RawFile, true, export.Perm, export.Shared).Should().Be((R | W, R | W | WU));
    }

    [Fact]
    public void A_backing_file_is_read_and_shares_write_only_when_the_parent_does()
    {
        PermissionRules.ForChild(ChildKind.Cow, true, R | W, All).Should().Be((R, All));
        PermissionRules.ForChild(ChildKind.Cow, true, R | W, R | WU).Should().Be((R, R | WU));
    }

    [Fact]
    public void Data_files_grow_with_writes_and_are_never_resized_by_others()
    {
        PermissionRules.ForChild(ChildKind.Data, true, WU, All).Should().Be((W | WU | RS, R | W | WU));
    }

    [Fact]
    public void Names_are_qemus_in_bit_order()
    {
        (W | RS).Describe().Should().Be("write, resize");
        All.Describe().Should().Be("consistent read, write, write unchanged, resize");
        BlockPermissions.None.Describe().Should().BeEmpty();
    }

    [Theory]
    [InlineData("qcow2", "file", ChildKind.Storage)]
    [InlineData("raw", "file", ChildKind.RawFile)]
    [InlineData("copy-before-write", "file", ChildKind.CopyBeforeWriteSource)]
    [InlineData("copy-before-write", "target", ChildKind.CopyBeforeWriteTarget)]
    [InlineData("qcow2", "backing", ChildKind.Cow)]
    [InlineData("qcow2", "data-file", ChildKind.Data)]
    [InlineData("blkdebug", "image", ChildKind.Filtered)]
    public void Edges_get_their_kind_from_the_parent_driver_and_role(string driver, string role, ChildKind kind) =>
        ChildKinds.Of(driver, role).Should().Be(kind);
}
