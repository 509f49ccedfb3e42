namespace Backup.Block.Drivers.Qcow2;

/// <summary>
/// An LRU cache of metadata tables (L2 tables, refcount blocks) keyed by their offset in the image
/// file. The cache is write-through: whoever changes a table writes the changed bytes to the file
/// before releasing the metadata lock, so an evicted table never holds unwritten state and a kill at
/// any point loses nothing that was acknowledged.
/// </summary>
/// <remarks>
/// Lookups take only the cache's own short lock, so reads hit the cache without waiting for the
/// metadata lock. Inserting (after loading from the file) happens under the metadata lock only, so
/// a table is never loaded while someone else is changing it.
/// </remarks>
internal sealed class Qcow2MetadataCache<T> where T : class
{
    private readonly Lock _lock = new();
    private readonly Dictionary<long, LinkedListNode<(long Offset, T Table)>> _map = [];
    private readonly LinkedList<(long Offset, T Table)> _lru = new();

    public Qcow2MetadataCache(int capacity) => Capacity = Math.Max(capacity, 2);

    public int Capacity { get; }

    public int Count
    {
        get
        {
            lock (_lock)
            {
                return _map.Count;
            }
        }
    }

    public T? TryGet(long offset)
    {
        lock (_lock)
        {
            if (!_map.TryGetValue(offset, out var node))
            {
                return null;
            }
            _lru.Remove(node);
            _lru.AddFirst(node);
            return node.Value.Table;
        }
    }

    public void Put(long offset, T table)
    {
        lock (_lock)
        {
            if (_map.TryGetValue(offset, out var existing))
            {
                _lru.Remove(existing);
                _map.Remove(offset);
            }
            var node = _lru.AddFirst((offset, table));
            _map[offset] = node;
            while (_map.Count > Capacity)
            {
                var last = _lru.Last!;
                _lru.RemoveLast();
                _map.Remove(last.Value.Offset);
            }
        }
    }

    /// <summary>Forgets a table whose cluster was freed, so a later reuse of the cluster is read afresh.</summary>
    public void Remove(long offset)
    {
        lock (_lock)
        {
            if (_map.Remove(offset, out var node))
            {
                _lru.Remove(node);
            }
        }
    }
}
