using Backup.Block;

namespace Backup.Nbd.Tests.Support;

/// <summary>Records events instead of sending them to QMP clients.</summary>
internal sealed class TestEvents : IEventSink
{
    private readonly Lock _lock = new();
    private readonly List<(string Name, IReadOnlyList<KeyValuePair<string, object?>> Data)> _events = [];

    public void Emit(string name, IReadOnlyList<KeyValuePair<string, object?>> data)
    {
        lock (_lock)
        {
            _events.Add((name, data));
        }
    }

    public IReadOnlyList<(string Name, IReadOnlyList<KeyValuePair<string, object?>> Data)> Events
    {
        get
        {
            lock (_lock)
            {
                return _events.ToList();
            }
        }
    }

    public IReadOnlyList<string> DeletedExportIds => Events.Where(e => e.Name == "BLOCK_EXPORT_DELETED")
        .Select(e => (string)e.Data.Single(p => p.Key == "id").Value!).ToList();
}
