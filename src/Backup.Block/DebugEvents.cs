namespace Backup.Block;

/// <summary>
/// QEMU's blkdebug events (QAPI BlkdebugEvent). Drivers raise them on the node they are about to use
/// (a format on its file child, the generic I/O path on the node written), as QEMU's BLKDBG_EVENT does;
/// only a blkdebug node reacts.
/// </summary>
public enum BlkdebugEvent
{
    L1Update, L1GrowAllocTable, L1GrowWriteTable, L1GrowActivateTable,
    L2Load, L2Update, L2UpdateCompressed, L2AllocCowRead, L2AllocWrite,
    ReadAio, ReadBackingAio, ReadCompressed, WriteAio, WriteCompressed,
    VmstateLoad, VmstateSave, CowRead, CowWrite,
    ReftableLoad, ReftableGrow, ReftableUpdate,
    RefblockLoad, RefblockUpdate, RefblockUpdatePart, RefblockAlloc, RefblockAllocHookup, RefblockAllocWrite,
    RefblockAllocWriteBlocks, RefblockAllocWriteTable, RefblockAllocSwitchTable,
    ClusterAlloc, ClusterAllocBytes, ClusterFree,
    FlushToOs, FlushToDisk,
    PwritevRmwHead, PwritevRmwAfterHead, PwritevRmwTail, PwritevRmwAfterTail,
    Pwritev, PwritevZero, PwritevDone,
    EmptyImagePrepare, L1ShrinkWriteTable, L1ShrinkFreeL2Clusters, CorWrite, ClusterAllocSpace,
    None,
}

/// <summary>QEMU's spelling of <see cref="BlkdebugEvent"/> (the QAPI enum member names).</summary>
public static class BlkdebugEventNames
{
    private static readonly string[] Names =
    [
        "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
        "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
        "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
        "vmstate_load", "vmstate_save", "cow_read", "cow_write",
        "reftable_load", "reftable_grow", "reftable_update",
        "refblock_load", "refblock_update", "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
        "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
        "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
        "flush_to_os", "flush_to_disk",
        "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
        "pwritev", "pwritev_zero", "pwritev_done",
        "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space",
        "none",
    ];

    public static IReadOnlyList<string> All => Names;

    public static string Name(this BlkdebugEvent e) => Names[(int)e];

    public static bool TryParse(string name, out BlkdebugEvent e)
    {
        var i = Array.IndexOf(Names, name);
        e = (BlkdebugEvent)Math.Max(i, 0);
        return i >= 0;
    }
}

/// <summary>
/// What a node offers qemu-io's <c>break</c>, <c>remove_break</c>, <c>resume</c> and <c>wait_break</c>
/// (QEMU's bdrv_debug_breakpoint and friends): blkdebug pauses a request at a named event until resumed.
/// </summary>
public interface IDebugBreakpoints
{
    /// <summary>Pauses the next request that raises <paramref name="ev"/>, under <paramref name="tag"/>.</summary>
    void SetBreakpoint(BlkdebugEvent ev, string tag);

    /// <summary>Removes the breakpoint(s) with <paramref name="tag"/> and resumes what they hold; false when none has it.</summary>
    bool RemoveBreakpoint(string tag);

    /// <summary>Lets the request paused under <paramref name="tag"/> go on; false when none is paused under it.</summary>
    bool Resume(string tag);

    /// <summary>True while a request is paused under <paramref name="tag"/>.</summary>
    bool IsSuspended(string tag);
}
