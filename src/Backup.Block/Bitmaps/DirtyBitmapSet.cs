using System.Numerics;
using System.Runtime.CompilerServices;
using System.Text;

namespace Backup.Block.Bitmaps;

/// <summary>How a backup job leaves its sync bitmap when it ends (QAPI BitmapSyncMode).</summary>
public enum BitmapSyncMode
{
    /// <summary>On success the bitmap becomes the successor (only writes made during the job); on failure nothing is lost.</summary>
    OnSuccess,
    /// <summary>The bitmap is never cleared: it becomes bitmap OR successor.</summary>
    Never,
    /// <summary>As on-success, also on failure; then the clusters the job did not copy are merged back in.</summary>
    Always,
}

/// <summary>
/// The dirty bitmaps of one node (QEMU's bs->dirty_bitmaps plus dirty_bitmap_mutex): named and
/// anonymous bitmaps, the write observer that marks them, and every state transition. Get it with
/// <see cref="BlockNodeBitmapExtensions.GetDirtyBitmaps"/>.
/// </summary>
/// <remarks>
/// <para><b>Locking.</b> One lock per node (<c>_lock</c>) guards the list, every flag change, the
/// successor links, bit-array swaps and the set of arrays that writes mark. A write marks every
/// recording bitmap under this lock, so a mark is never split across a freeze, abdicate, reclaim or
/// clear: it lands wholly before or wholly after. The one exception is the lock-free fast path: if every
/// recording array already has the written range dirty (one word load each), the write changes
/// nothing and skips the lock; bits of a live array are only cleared under the lock, so this is
/// linearisable. Lock order: set lock, then an <see cref="HBitmap"/>'s lock, then its meta's.</para>
/// <para><b>Order.</b> Bitmaps are listed newest first, as QSD does. QEMU's abdicate keeps the
/// successor object under the parent's name, so after a successful backup the bitmap moves to where
/// the successor was created; <see cref="Abdicate"/> reproduces that.</para>
/// </remarks>
public sealed class DirtyBitmapSet
{
    /// <summary>BDRV_BITMAP_MAX_NAME_SIZE: longest name in UTF-8 bytes.</summary>
    public const int MaxNameBytes = 1023;

    public const long MinGranularity = 512;

    /// <summary>The granularity is a uint32 power of two in QMP, so 2 GiB is the largest.</summary>
    public const long MaxGranularity = 1L << 31;

    private readonly Lock _lock = new();
    private readonly List<DirtyBitmap> _bitmaps = [];
    private readonly List<DirtyBitmapBackup> _backups = [];
    private HBitmap[] _targets = [];
    private long _nextSequence;
    private int _observerAttached;

    internal DirtyBitmapSet(BlockNode node) => Node = node;

    public BlockNode Node { get; }

    // ------------------------------------------------------------------ queries

    /// <summary>Every bitmap, named and anonymous, newest first.</summary>
    public IReadOnlyList<DirtyBitmap> Bitmaps
    {
        get
        {
            lock (_lock)
            {
                return [.. _bitmaps.OrderByDescending(b => b.Sequence)];
            }
        }
    }

    /// <summary>The <c>dirty-bitmaps</c> list of query-named-block-nodes; empty means "omit the key".</summary>
    public IReadOnlyList<DirtyBitmapInfo> Query()
    {
        lock (_lock)
        {
            return [.. _bitmaps.OrderByDescending(b => b.Sequence).Select(b => b.GetInfo())];
        }
    }

    public bool IsEmpty
    {
        get
        {
            lock (_lock)
            {
                return _bitmaps.Count == 0;
            }
        }
    }

    public DirtyBitmap? Find(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        lock (_lock)
        {
            return FindLocked(name);
        }
    }

    /// <summary>The named bitmap, or "Dirty bitmap 'x' not found".</summary>
    public DirtyBitmap Get(string name) =>
        Find(name) ?? throw new BlockException($"Dirty bitmap '{name}' not found");

    private DirtyBitmap? FindLocked(string name) =>
        _bitmaps.Find(b => b.Name is not null && string.Equals(b.Name, name, StringComparison.Ordinal));

    // ------------------------------------------------------------------ validation

    /// <summary>"Bitmap name cannot be empty" (checked before the node lookup in QSD).</summary>
    public static void CheckNameNotEmpty(string? name)
    {
        if (string.IsNullOrEmpty(name))
        {
            throw new BlockException("Bitmap name cannot be empty");
        }
    }

    /// <summary>"Bitmap name too long: NAME" for more than 1023 UTF-8 bytes.</summary>
    public static void CheckNameLength(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (Encoding.UTF8.GetByteCount(name) > MaxNameBytes)
        {
            throw new BlockException($"Bitmap name too long: {name}");
        }
    }

    /// <summary>A power of two from 512 B to 2 GiB, else QSD's message.</summary>
    public static void CheckGranularity(long granularity)
    {
        if (granularity < MinGranularity || granularity > MaxGranularity || !BitOperations.IsPow2(granularity))
        {
            throw new BlockException("Granularity must be power of 2 and at least 512");
        }
    }

    /// <summary>
    /// QEMU's bdrv_get_default_bitmap_granularity: the node's cluster size clamped to [4 KiB, 64 KiB]
    /// (qcow2), or 64 KiB when the node has none (raw, file).
    /// </summary>
    public static long DefaultGranularity(BlockNode node)
    {
        ArgumentNullException.ThrowIfNull(node);
        return node.GetImageInfo().ClusterSize is int cluster and > 0
            ? Math.Clamp(cluster, 4096, 65536)
            : 65536;
    }

    // ------------------------------------------------------------------ create, remove

    /// <summary>
    /// block-dirty-bitmap-add on this node, with QSD's checks in its order: empty name (the caller may
    /// check it before looking up the node), granularity, name already used, name too long.
    /// </summary>
    /// <param name="granularity">Null for <see cref="DefaultGranularity"/>.</param>
    public DirtyBitmap Add(string name, long? granularity = null, bool persistent = false, bool disabled = false)
    {
        CheckNameNotEmpty(name);
        var g = granularity ?? DefaultGranularity(Node);
        CheckGranularity(g);
        DirtyBitmap bitmap;
        lock (_lock)
        {
            if (FindLocked(name) is not null)
            {
                throw new BlockException($"Bitmap already exists: {name}");
            }
            CheckNameLength(name);
            bitmap = CreateLocked(name, g, enabled: !disabled);
            if (persistent)
            {
                bitmap.SetPersistent(true);
            }
        }
        AttachObserver();
        return bitmap;
    }

    /// <summary>
    /// An anonymous bitmap (name null), listed by the query like QSD's job bitmaps: e.g. a backup's
    /// copy bitmap (disabled). Release it with <see cref="Release"/>.
    /// </summary>
    public DirtyBitmap CreateAnonymous(long granularity, bool enabled)
    {
        CheckGranularity(granularity);
        DirtyBitmap bitmap;
        lock (_lock)
        {
            bitmap = CreateLocked(null, granularity, enabled);
        }
        AttachObserver();
        return bitmap;
    }

    private DirtyBitmap CreateLocked(string? name, long granularity, bool enabled, long? size = null)
    {
        var bitmap = new DirtyBitmap(this, name, granularity, size ?? Node.Length, enabled, _nextSequence++);
        _bitmaps.Add(bitmap);
        RefreshRecordingLocked();
        return bitmap;
    }

    /// <summary>
    /// block-dirty-bitmap-remove: "Dirty bitmap 'x' not found", then rejects busy (including frozen)
    /// and readonly bitmaps; an inconsistent one can be removed. Returns the removed bitmap (the caller
    /// deletes a persistent one from the image).
    /// </summary>
    public DirtyBitmap Remove(string name)
    {
        lock (_lock)
        {
            var bitmap = FindLocked(name) ?? throw new BlockException($"Dirty bitmap '{name}' not found");
            bitmap.Check(BitmapCheck.Busy | BitmapCheck.ReadOnly);
            ReleaseLocked(bitmap);
            return bitmap;
        }
    }

    /// <summary>Drops a bitmap without user checks (a job's anonymous bitmaps, node close). It must not be busy, frozen or a successor.</summary>
    public void Release(DirtyBitmap bitmap)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        lock (_lock)
        {
            ReleaseLocked(bitmap);
        }
    }

    private void ReleaseLocked(DirtyBitmap bitmap)
    {
        if (!ReferenceEquals(bitmap.Owner, this) || !_bitmaps.Contains(bitmap))
        {
            throw new InvalidOperationException($"{bitmap} is not in this set");
        }
        if (bitmap.Busy || bitmap.IsFrozen || _bitmaps.Exists(b => ReferenceEquals(b.Successor, bitmap)))
        {
            throw new InvalidOperationException($"{bitmap} is in use and cannot be released");
        }
        _bitmaps.Remove(bitmap);
        _backups.RemoveAll(b => ReferenceEquals(b.Bitmap, bitmap));
        RefreshRecordingLocked();
    }

    // ------------------------------------------------------------------ command-shaped helpers

    /// <summary>block-dirty-bitmap-clear: rejects busy, readonly and inconsistent bitmaps, then clears.</summary>
    public DirtyBitmap Clear(string name)
    {
        var bitmap = Get(name);
        bitmap.Check(BitmapCheck.Default);
        bitmap.Clear();
        return bitmap;
    }

    /// <summary>block-dirty-bitmap-enable: rejects busy and inconsistent bitmaps (readonly is fine), then enables.</summary>
    public DirtyBitmap Enable(string name)
    {
        var bitmap = Get(name);
        bitmap.Check(BitmapCheck.AllowReadOnly);
        bitmap.Enable();
        return bitmap;
    }

    /// <summary>block-dirty-bitmap-disable: rejects busy and inconsistent bitmaps (readonly is fine), then disables.</summary>
    public DirtyBitmap Disable(string name)
    {
        var bitmap = Get(name);
        bitmap.Check(BitmapCheck.AllowReadOnly);
        bitmap.Disable();
        return bitmap;
    }

    /// <summary>x-debug-block-dirty-bitmap-sha256 (QEMU checks nothing but the name).</summary>
    public string Sha256(string name) => Get(name).Sha256();

    // ------------------------------------------------------------------ merge

    /// <summary>
    /// block-dirty-bitmap-merge: destination := destination OR every source. Checks the destination
    /// (busy, readonly, inconsistent), then each source in order (busy, inconsistent) and its size
    /// ("Bitmaps are of different sizes (destination size is X, source size is Y) and can't be
    /// merged"); nothing changes unless all pass. Granularities may differ. Sources may be on other
    /// nodes. With <paramref name="withBackup"/> (in a transaction) returns a backup whose
    /// <see cref="DirtyBitmapBackup.Restore"/> undoes the merge; otherwise returns null.
    /// </summary>
    public static DirtyBitmapBackup? Merge(DirtyBitmap destination, IReadOnlyList<DirtyBitmap> sources, bool withBackup = false)
    {
        ArgumentNullException.ThrowIfNull(destination);
        ArgumentNullException.ThrowIfNull(sources);
        destination.Check(BitmapCheck.Default);
        var dstBits = destination.Bits;
        var union = new HBitmap(dstBits.Size, dstBits.GranularityShift);
        foreach (var source in sources)
        {
            source.Check(BitmapCheck.AllowReadOnly);
            if (source.Size != destination.Size)
            {
                throw new BlockException($"Bitmaps are of different sizes (destination size is {destination.Size}, " +
                    $"source size is {source.Size}) and can't be merged");
            }
            union.Merge(source.Bits);
        }
        var owner = destination.Owner;
        lock (owner._lock)
        {
            destination.Check(BitmapCheck.Default);
            if (withBackup)
            {
                return owner.ReplaceWithBackupLocked(destination, old =>
                {
                    var merged = old.Clone();
                    merged.Merge(union);
                    return merged;
                });
            }
            destination.Bits.Merge(union);
            return null;
        }
    }

    // ------------------------------------------------------------------ successors (jobs)

    /// <summary>
    /// Starts a job on <paramref name="bitmap"/>: attaches an anonymous successor that records the writes
    /// made from now on (if the bitmap was enabled), and freezes the bitmap (not recording, busy) so the
    /// job reads a stable set of bits. End with exactly one of <see cref="Abdicate"/>,
    /// <see cref="Reclaim"/> or <see cref="Complete"/>.
    /// </summary>
    /// <returns>The successor.</returns>
    public DirtyBitmap Freeze(DirtyBitmap bitmap)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        lock (_lock)
        {
            CheckMember(bitmap);
            if (bitmap.Busy)
            {
                throw new BlockException("Cannot create a successor for a bitmap that is in-use by an operation");
            }
            if (bitmap.IsFrozen)
            {
                throw new BlockException("Cannot create a successor for a bitmap that already has one");
            }
            // Same size as the bitmap (not the node's current length) so abdicate and reclaim line up.
            var successor = CreateLocked(null, bitmap.Granularity, bitmap.Enabled, bitmap.Size);
            bitmap.SetEnabledLocked(false);
            bitmap.SetSuccessorLocked(successor);
            bitmap.SetBusyLocked(true);
            RefreshRecordingLocked();
            return successor;
        }
    }

    /// <summary>
    /// The job succeeded (bitmap sync mode on-success, or always): the bitmap's bits become the
    /// successor's, i.e. only the writes made during the job; it records again if the successor did,
    /// is no longer busy, and takes the successor's place in the query order.
    /// </summary>
    public void Abdicate(DirtyBitmap bitmap)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        lock (_lock)
        {
            CheckMember(bitmap);
            var successor = bitmap.Successor
                ?? throw new BlockException("Cannot relinquish control if there's no successor present");
            bitmap.Swap(successor.Bits);
            EndSuccessionLocked(bitmap, successor);
            bitmap.Sequence = successor.Sequence;
        }
    }

    /// <summary>
    /// The job failed or was cancelled (or sync mode never): the bitmap becomes its frozen bits OR the
    /// successor's, so nothing is lost; it records again if the successor did and is no longer busy.
    /// </summary>
    public void Reclaim(DirtyBitmap bitmap)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        lock (_lock)
        {
            CheckMember(bitmap);
            var successor = bitmap.Successor
                ?? throw new BlockException("Cannot reclaim a successor when none is present");
            // The successor's array becomes the bitmap's; writes keep landing in it throughout.
            var merged = successor.Bits;
            merged.Merge(bitmap.Bits);
            bitmap.Swap(merged);
            EndSuccessionLocked(bitmap, successor);
        }
    }

    /// <summary>
    /// Ends a backup job's use of its sync bitmap as QEMU's backup_cleanup_sync_bitmap does: abdicate when
    /// (success or mode always) and mode is not never, else reclaim; when mode is always and the job
    /// failed, the bits the job did not copy (<paramref name="notCopied"/>, its copy bitmap, any
    /// granularity, same size) are merged back in.
    /// </summary>
    public void Complete(DirtyBitmap bitmap, BitmapSyncMode mode, bool success, HBitmap? notCopied = null)
    {
        ArgumentNullException.ThrowIfNull(bitmap);
        lock (_lock)
        {
            var sync = (success || mode == BitmapSyncMode.Always) && mode != BitmapSyncMode.Never;
            if (sync)
            {
                Abdicate(bitmap);
            }
            else
            {
                Reclaim(bitmap);
            }
            if (!success && mode == BitmapSyncMode.Always && notCopied is not null)
            {
                bitmap.Bits.Merge(notCopied);
            }
        }
    }

    private void EndSuccessionLocked(DirtyBitmap bitmap, DirtyBitmap successor)
    {
        bitmap.SetEnabledLocked(successor.Enabled);
        bitmap.SetSuccessorLocked(null);
        bitmap.SetBusyLocked(false);
        _bitmaps.Remove(successor);
        RefreshRecordingLocked();
    }

    // ------------------------------------------------------------------ resize

    /// <summary>
    /// Resizes every bitmap to the node's new length (call after the node was resized). Fails while a
    /// bitmap is busy or frozen, as QEMU refuses to resize then.
    /// </summary>
    public void Truncate(long newSize)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(newSize);
        lock (_lock)
        {
            if (_bitmaps.Find(b => b.Busy || b.IsFrozen) is { } busy)
            {
                throw new InvalidOperationException($"{busy} is in use; the node cannot be resized");
            }
            foreach (var b in _bitmaps)
            {
                b.Bits.Truncate(newSize);
            }
            foreach (var b in _backups)
            {
                b.Old.Truncate(newSize);
            }
        }
    }

    // ------------------------------------------------------------------ marking

    /// <summary>
    /// Marks <c>[offset, offset + length)</c> in every recording bitmap (and in the backups of recording
    /// bitmaps that a transaction holds). The node's write observer calls this after each successful
    /// write, write-zeroes and discard; the range is cut to each bitmap's size.
    /// </summary>
    public void MarkDirty(long offset, long length)
    {
        if (length <= 0 || offset < 0)
        {
            return;
        }
        var targets = Volatile.Read(ref _targets);
        if (targets.Length == 0)
        {
            return;
        }
        var allDirty = true;
        foreach (var t in targets)
        {
            if (!t.IsAllDirtyFast(offset, length))
            {
                allDirty = false;
                break;
            }
        }
        if (allDirty)
        {
            return;
        }
        lock (_lock)
        {
            foreach (var t in _targets)
            {
                var size = t.Size;
                if (offset < size)
                {
                    t.Set(offset, Math.Min(length, size - offset));
                }
            }
        }
    }

    private void AttachObserver()
    {
        if (Interlocked.Exchange(ref _observerAttached, 1) == 0)
        {
            Node.AddWriteObserver(new DirtyBitmapWriteObserver(this));
        }
    }

    // ------------------------------------------------------------------ internals

    internal void WithLock(Action action)
    {
        lock (_lock)
        {
            action();
        }
    }

    internal T WithLock<T>(Func<T> func)
    {
        lock (_lock)
        {
            return func();
        }
    }

    internal void SetEnabled(DirtyBitmap bitmap, bool enabled)
    {
        lock (_lock)
        {
            if (bitmap.IsFrozen)
            {
                throw new InvalidOperationException($"{bitmap} is frozen");
            }
            bitmap.SetEnabledLocked(enabled);
            RefreshRecordingLocked();
        }
    }

    internal DirtyBitmapBackup ReplaceWithBackup(DirtyBitmap bitmap, Func<HBitmap, HBitmap> replacement)
    {
        lock (_lock)
        {
            return ReplaceWithBackupLocked(bitmap, replacement);
        }
    }

    private DirtyBitmapBackup ReplaceWithBackupLocked(DirtyBitmap bitmap, Func<HBitmap, HBitmap> replacement)
    {
        CheckMember(bitmap);
        var old = bitmap.Bits;
        bitmap.Swap(replacement(old));
        var backup = new DirtyBitmapBackup(bitmap, old);
        _backups.Add(backup);
        RefreshRecordingLocked();
        return backup;
    }

    internal void RestoreBackup(DirtyBitmapBackup backup)
    {
        lock (_lock)
        {
            if (!_backups.Remove(backup))
            {
                throw new InvalidOperationException("the backup was already restored or released");
            }
            backup.Bitmap.Swap(backup.Old);
            RefreshRecordingLocked();
        }
    }

    internal void DropBackup(DirtyBitmapBackup backup)
    {
        lock (_lock)
        {
            if (_backups.Remove(backup))
            {
                RefreshRecordingLocked();
            }
        }
    }

    /// <summary>Recomputes the arrays writes mark: enabled bitmaps, plus backups held for enabled bitmaps.</summary>
    internal void RefreshRecordingLocked()
    {
        var targets = new List<HBitmap>();
        foreach (var b in _bitmaps)
        {
            if (b.Enabled)
            {
                targets.Add(b.Bits);
            }
        }
        foreach (var k in _backups)
        {
            if (k.Bitmap.Enabled)
            {
                targets.Add(k.Old);
            }
        }
        Volatile.Write(ref _targets, [.. targets]);
    }

    private void CheckMember(DirtyBitmap bitmap)
    {
        if (!ReferenceEquals(bitmap.Owner, this) || !_bitmaps.Contains(bitmap))
        {
            throw new InvalidOperationException($"{bitmap} is not in this set");
        }
    }

    /// <summary>Marks the node's bitmaps after each change of its data.</summary>
    private sealed class DirtyBitmapWriteObserver(DirtyBitmapSet set) : IWriteObserver
    {
        public ValueTask BeforeWriteAsync(BlockNode node, long offset, long length, WriteKind kind, CancellationToken cancellationToken) =>
            ValueTask.CompletedTask;

        /// <summary>Writes and write-zeroes dirty; so does a discard that reached the node (discard=unmap).</summary>
        public void AfterWrite(BlockNode node, long offset, long length, WriteKind kind) => set.MarkDirty(offset, length);
    }
}

/// <summary>
/// A bit array a transaction replaced (clear, merge), kept so that abort can put it back. While it
/// is held, writes mark it as well as the live array, so <see cref="Restore"/> loses no write.
/// Dispose it in the transaction's clean step.
/// </summary>
public sealed class DirtyBitmapBackup : IDisposable
{
    internal DirtyBitmapBackup(DirtyBitmap bitmap, HBitmap old)
    {
        Bitmap = bitmap;
        Old = old;
    }

    public DirtyBitmap Bitmap { get; }

    internal HBitmap Old { get; }

    /// <summary>Abort: reinstalls the bits the bitmap had before the action (plus writes since).</summary>
    public void Restore() => Bitmap.Owner.RestoreBackup(this);

    /// <summary>Clean: forgets the backup (no-op after <see cref="Restore"/>).</summary>
    public void Dispose() => Bitmap.Owner.DropBackup(this);
}

/// <summary>Dirty bitmaps hang off a node without a field in <see cref="BlockNode"/>.</summary>
public static class BlockNodeBitmapExtensions
{
    private static readonly ConditionalWeakTable<BlockNode, DirtyBitmapSet> s_sets = new();

    /// <summary>The node's bitmap set, created on first use. Its write observer is attached when the first bitmap is created.</summary>
    public static DirtyBitmapSet GetDirtyBitmaps(this BlockNode node)
    {
        ArgumentNullException.ThrowIfNull(node);
        return s_sets.GetValue(node, n => new DirtyBitmapSet(n));
    }

    /// <summary>The node's bitmap set if one was ever made, else null (cheap for queries).</summary>
    public static DirtyBitmapSet? TryGetDirtyBitmaps(this BlockNode node)
    {
        ArgumentNullException.ThrowIfNull(node);
        return s_sets.TryGetValue(node, out var set) ? set : null;
    }
}
