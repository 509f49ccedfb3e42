namespace Backup.Block;

/// <summary>
/// Where the block layer reports what clients are told asynchronously (QMP events). Data members are
/// ordered name/value pairs of strings, numbers, booleans, nested pairs or lists: the protocol layer
/// turns them into JSON. Logs are not events: this is only for what the protocol declares.
/// </summary>
public interface IEventSink
{
    void Emit(string name, IReadOnlyList<KeyValuePair<string, object?>> data);
}
