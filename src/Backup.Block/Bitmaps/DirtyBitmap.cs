namespace Backup.Block.Bitmaps;

/// <summary>Which states a guard rejects (QEMU's BDRV_BITMAP_* check flags).</summary>
[Flags]
public enum BitmapCheck
{
    None = 0,
    /// <summary>"Bitmap 'x' is currently in use by another operation and cannot be used".</summary>
    Busy = 1,
    /// <summary>"Bitmap 'x' is readonly and cannot be modified".</summary>
    ReadOnly = 2,
    /// <summary>"Bitmap 'x' is inconsistent and cannot be used".</summary>
    Inconsistent = 4,
    /// <summary>Anything that modifies the bitmap: clear, merge target (BDRV_BITMAP_DEFAULT).</summary>
    Default = Busy | ReadOnly | Inconsistent,
    /// <summary>Reading it or changing only its flags: enable, disable, merge source, backup (BDRV_BITMAP_ALLOW_RO).</summary>
    AllowReadOnly = Busy | Inconsistent,
}

/// <summary>One entry of <c>dirty-bitmaps</c> in query-named-block-nodes (QEMU's BlockDirtyInfo, without the deprecated status).</summary>
/// <param name="Name">Null for the anonymous bitmaps a job creates (successor, copy bitmap).</param>
/// <param name="Count">Dirty bytes: dirty chunks × granularity, not clipped to the node size.</param>
/// <param name="Inconsistent">Reported only when true.</param>
/// <param name="CrashConsistent">Our extension, reported only when true.</param>
public sealed record DirtyBitmapInfo(
    string? Name, bool Recording, bool Persistent, bool Busy, long Granularity, long Count, bool Inconsistent,
    bool CrashConsistent = false);

/// <summary>
/// A dirty bitmap on a node: named (user-created) or anonymous (a job's successor or copy bitmap).
/// Create them with <see cref="DirtyBitmapSet"/>; every state change goes through the set, under its lock.
/// </summary>
/// <remarks>
/// <para><b>States</b> (QEMU's block/dirty-bitmap.c table, minus the deprecated <c>status</c>):</para>
/// <list type="table">
/// <listheader><term>state</term><description>meaning</description></listheader>
/// <item><term>enabled</term><description>Writes to the node set bits. <c>recording</c> in QMP is
/// enabled, or frozen with an enabled successor.</description></item>
/// <item><term>disabled</term><description>Writes are ignored; clear and merge still change it.</description></item>
/// <item><term>busy</term><description>Used by a job or an NBD export: no QMP command may use or change
/// it. A frozen bitmap is busy.</description></item>
/// <item><term>frozen</term><description>Has a successor (see <see cref="DirtyBitmapSet.Freeze"/>): its
/// bits stay as they were at freeze; writes go to the successor; it ends by abdicating or reclaiming.</description></item>
/// <item><term>readonly</term><description>Loaded from a read-only image: cannot be modified.</description></item>
/// <item><term>inconsistent</term><description>A persistent bitmap found in use on open (unclean
/// shutdown): disabled, unusable, can only be removed.</description></item>
/// <item><term>persistent</term><description>Stored in the image at clean close and loaded at open (qcow2, see <see cref="IPersistentBitmapStore"/>).</description></item>
/// </list>
/// <para><b>Locking.</b> Flags and the successor link change only under the owning set's lock; reading
/// a single flag is a plain volatile read. The bits live in an <see cref="HBitmap"/> with its own lock;
/// <see cref="Bits"/> may be replaced (abdicate, reclaim, clear with backup), always under the set lock.</para>
/// </remarks>
public sealed class DirtyBitmap
{
    private HBitmap _bits;
    private volatile bool _enabled;
    private volatile bool _busy;
    private volatile bool _persistent;
    private volatile bool _inconsistent;
    private volatile bool _readOnly;
    private volatile DirtyBitmap? _successor;
    private volatile CrashConsistentTracker? _crashTracker;
    private int _metaBytesPerBit;

    internal DirtyBitmap(DirtyBitmapSet owner, string? name, long granularity, long size, bool enabled, long sequence)
    {
        Owner = owner;
        Name = name;
        Granularity = granularity;
        _bits = new HBitmap(size, System.Numerics.BitOperations.Log2((ulong)granularity));
        _enabled = enabled;
        Sequence = sequence;
    }

    public DirtyBitmapSet Owner { get; }

    public BlockNode Node => Owner.Node;

    /// <summary>Null for anonymous bitmaps.</summary>
    public string? Name { get; }

    /// <summary>Bytes per bit: a power of two, 512 B .. 2 GiB.</summary>
    public long Granularity { get; }

    /// <summary>Bytes covered: the node's length when the bitmap was created or last truncated.</summary>
    public long Size => Bits.Size;

    /// <summary>The bits. Replaced by abdicate, reclaim and clear-with-backup; read it again after those.</summary>
    public HBitmap Bits => Volatile.Read(ref _bits);

    /// <summary>Writes set bits in this bitmap itself (QEMU: !disabled). False while frozen.</summary>
    public bool Enabled => _enabled;

    /// <summary>QMP's <c>recording</c>: enabled, or frozen with an enabled successor.</summary>
    public bool Recording => _enabled || (_successor?._enabled ?? false);

    public bool Busy => _busy;

    public bool Persistent => _persistent;

    public bool Inconsistent => _inconsistent;

    public bool ReadOnly => _readOnly;

    /// <summary>The successor while frozen (see <see cref="DirtyBitmapSet.Freeze"/>), else null.</summary>
    public DirtyBitmap? Successor => _successor;

    public bool IsFrozen => _successor is not null;

    /// <summary>
    /// Keeps the bitmap crash-consistent in its image (our extension; see <see cref="CrashConsistentTracker"/>),
    /// or null. Set by the node that stores the bitmap.
    /// </summary>
    public CrashConsistentTracker? CrashTracker
    {
        get => _crashTracker;
        set => _crashTracker = value;
    }

    /// <summary>Dirty bytes (dirty chunks × granularity), as QMP reports <c>count</c>.</summary>
    public long Count => Bits.DirtyByteCount;

    /// <summary>Creation order within the node; the query lists the highest first. Abdicate takes the successor's.</summary>
    internal long Sequence { get; set; }

    /// <summary>The meta bitmap (see <see cref="CreateMeta"/>), or null.</summary>
    public HBitmap? Meta => Bits.Meta;

    // ------------------------------------------------------------------ guards

    /// <summary>Throws QSD's error when the bitmap is in a state that <paramref name="flags"/> rejects (checked in QEMU's order).</summary>
    public void Check(BitmapCheck flags)
    {
        if ((flags & BitmapCheck.Busy) != 0 && _busy)
        {
            throw new BlockException($"Bitmap '{Name}' is currently in use by another operation and cannot be used");
        }
        if ((flags & BitmapCheck.ReadOnly) != 0 && _readOnly)
        {
            throw new BlockException($"Bitmap '{Name}' is readonly and cannot be modified");
        }
        if ((flags & BitmapCheck.Inconsistent) != 0 && _inconsistent)
        {
            throw new BlockException($"Bitmap '{Name}' is inconsistent and cannot be used");
        }
    }

    // ------------------------------------------------------------------ reads

    /// <summary>The query entry.</summary>
    public DirtyBitmapInfo GetInfo() => new(Name, Recording, _persistent, _busy, Granularity, Count, _inconsistent, _crashTracker is not null);

    /// <summary>x-debug-block-dirty-bitmap-sha256.</summary>
    public string Sha256() => Bits.Sha256();

    public override string ToString() => $"dirty bitmap '{Name ?? "(anonymous)"}' on node '{Node.NodeName}'";

    // ------------------------------------------------------------------ changes (all under the set lock)

    /// <summary>Starts recording writes. Not allowed while frozen (enable the job's successor instead).</summary>
    public void Enable() => Owner.SetEnabled(this, true);

    /// <summary>Stops recording writes.</summary>
    public void Disable() => Owner.SetEnabled(this, false);

    /// <summary>Marks the bitmap as used by a job or an export (or releases it).</summary>
    public void SetBusy(bool busy) => Owner.WithLock(() => _busy = busy);

    public void SetPersistent(bool persistent) => Owner.WithLock(() => _persistent = persistent);

    public void SetReadOnly(bool readOnly) => Owner.WithLock(() => _readOnly = readOnly);

    /// <summary>Flags a persistent bitmap found in use on open: it also stops recording (QEMU).</summary>
    public void SetInconsistent()
    {
        Owner.WithLock(() =>
        {
            if (!_persistent)
            {
                throw new InvalidOperationException("only a persistent bitmap can be inconsistent");
            }
            _inconsistent = true;
            _enabled = false;
            Owner.RefreshRecordingLocked();
        });
    }

    /// <summary>Sets bits for <c>[offset, offset + length)</c> (the node's writes do this by themselves).</summary>
    public void SetDirty(long offset, long length) => Bits.Set(offset, length);

    /// <summary>Clears bits for <c>[offset, offset + length)</c>.</summary>
    public void ResetDirty(long offset, long length) => Bits.Reset(offset, length);

    /// <summary>block-dirty-bitmap-clear outside a transaction.</summary>
    public void Clear() => Bits.Clear();

    /// <summary>
    /// block-dirty-bitmap-clear in a transaction: installs an empty bit array and keeps the old one in
    /// the returned backup (QEMU's bdrv_clear_dirty_bitmap with <c>out</c>). Abort calls
    /// <see cref="DirtyBitmapBackup.Restore"/>; either way the transaction's clean step disposes it.
    /// </summary>
    public DirtyBitmapBackup ClearWithBackup() => Owner.ReplaceWithBackup(this, old => new HBitmap(old.Size, old.GranularityShift));

    /// <summary>
    /// Creates a meta bitmap (see <see cref="HBitmap.CreateMeta"/>): one bit per
    /// <paramref name="bitmapBytesPerMetaBit"/> bytes of serialized bitmap, marking what changed since
    /// the consumer last reset it. It follows the bitmap through abdicate/reclaim (fully dirty after).
    /// </summary>
    public HBitmap CreateMeta(int bitmapBytesPerMetaBit) => Owner.WithLock(() =>
    {
        var meta = Bits.CreateMeta(bitmapBytesPerMetaBit);
        _metaBytesPerBit = bitmapBytesPerMetaBit;
        return meta;
    });

    public void ReleaseMeta() => Owner.WithLock(() =>
    {
        Bits.ReleaseMeta();
        _metaBytesPerBit = 0;
    });

    // ------------------------------------------------------------------ internal (set lock held)

    internal void SetEnabledLocked(bool enabled) => _enabled = enabled;

    internal void SetBusyLocked(bool busy) => _busy = busy;

    internal void SetSuccessorLocked(DirtyBitmap? successor) => _successor = successor;

    /// <summary>Installs a new bit array; returns the old one. Moves the meta bitmap along.</summary>
    internal HBitmap Swap(HBitmap bits)
    {
        var old = Bits;
        if (_metaBytesPerBit != 0 && bits.Meta is null)
        {
            old.ReleaseMeta();
            bits.CreateMeta(_metaBytesPerBit).SetAll();
        }
        Volatile.Write(ref _bits, bits);
        return old;
    }
}
