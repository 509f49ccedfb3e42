using System.Collections.Concurrent;

namespace Backup.Block.Drivers.Qcow2;

/// <summary>
/// A cache of metadata tables (L2 tables, refcount blocks) keyed by their offset in the image file.
/// The cache is write-through: whoever changes a table writes the changed bytes to the file before
/// releasing the metadata lock, so an evicted table never holds unwritten state and a kill at any
/// point loses nothing that was acknowledged.
/// </summary>
/// <remarks>
/// Lookups take no lock at all (a concurrent dictionary read and a plain store of the use stamp), so
/// every read request that hits the cache costs O(1) without contention. Inserting and removing happen
/// under the node's metadata lock only, so a table is never loaded while someone else is changing it.
/// Eviction is approximately least-recently-used: when the cache is over capacity, the oldest
/// sixteenth (by use stamp) goes at once, which keeps the scan's cost per insert constant.
/// </remarks>
internal sealed class Qcow2MetadataCache<T> where T : class
{
    private readonly ConcurrentDictionary<long, Slot> _map = new();
    private long _clock;
    private int _count;

    public Qcow2MetadataCache(int capacity) => Capacity = Math.Max(capacity, 2);

    public int Capacity { get; }

    public int Count => Volatile.Read(ref _count);

    public T? TryGet(long offset)
    {
        if (!_map.TryGetValue(offset, out var slot))
        {
            return null;
        }
        // A racy stamp is fine: it only orders evictions. The clock advances only on inserts, so a
        // hit writes a shared cache line only when the stamp changes.
        var now = Volatile.Read(ref _clock);
        if (slot.LastUse != now)
        {
            slot.LastUse = now;
        }
        return slot.Table;
    }

    /// <summary>Adds or replaces a table (metadata lock held).</summary>
    public void Put(long offset, T table)
    {
        // The new stamp is above every other, so the table just put is never the one evicted.
        var stamp = Interlocked.Increment(ref _clock);
        var isNew = !_map.ContainsKey(offset);
        _map[offset] = new Slot(table, stamp);
        if (isNew && ++_count > Capacity)
        {
            EvictOldest();
        }
    }

    /// <summary>Forgets a table whose cluster was freed, so a later reuse of the cluster is read afresh (metadata lock held).</summary>
    public void Remove(long offset)
    {
        if (_map.TryRemove(offset, out _))
        {
            _count--;
        }
    }

    private void EvictOldest()
    {
        var stamps = _map.Select(kv => kv.Value.LastUse).ToArray();
        Array.Sort(stamps);
        var batch = Math.Max(1, Capacity / 16);
        var limit = stamps[Math.Min(batch, stamps.Length) - 1];
        foreach (var kv in _map)
        {
            if (_count <= Capacity - batch + 1)
            {
                break;
            }
            if (kv.Value.LastUse <= limit && _map.TryRemove(kv.Key, out _))
            {
                _count--;
            }
        }
    }

    private sealed class Slot(T table, long lastUse)
    {
        public T Table { get; } = table;

        public long LastUse { get; set; } = lastUse;
    }
}
