using System.Text.Json.Nodes;
using System.Threading.Channels;

namespace Backup.Qmp.Client;

/// <summary>
/// One asynchronous event: <c>{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}</c>.
/// </summary>
/// <param name="Name">The event name, e.g. "JOB_STATUS_CHANGE".</param>
/// <param name="Data">Its data; an empty object when the event has none.</param>
/// <param name="Timestamp">The server's clock when it emitted the event.</param>
/// <param name="Message">The whole message as received.</param>
public sealed record QmpEvent(string Name, JsonObject Data, DateTimeOffset Timestamp, JsonObject Message)
{
    internal static QmpEvent From(JsonObject message)
    {
        var name = message["event"]?.GetValue<string>() ?? "";
        var data = message["data"] as JsonObject ?? [];
        var ts = message["timestamp"] as JsonObject;
        var seconds = ts?["seconds"]?.GetValue<long>() ?? 0;
        var micros = ts?["microseconds"]?.GetValue<long>() ?? 0;
        return new QmpEvent(name, data, DateTimeOffset.FromUnixTimeSeconds(seconds).AddTicks(micros * 10), message);
    }

    /// <summary>A string member of <see cref="Data"/>, or null.</summary>
    public string? GetString(string key) => Data[key] is JsonValue v && v.TryGetValue<string>(out var s) ? s : null;
}

/// <summary>
/// Every event the connection receives from the moment the listener was made, in arrival order
/// (qemu.qmp's EventListener). Several listeners each get their own copy; disposing one stops it.
/// The queue is unbounded: a listener that is not read keeps what arrives, so dispose the ones you leave.
/// </summary>
public sealed class QmpEventListener : IDisposable
{
    private readonly Channel<QmpEvent> _queue = Channel.CreateUnbounded<QmpEvent>(new UnboundedChannelOptions { SingleReader = true });
    private readonly Action<QmpEventListener> _detach;

    internal QmpEventListener(Action<QmpEventListener> detach) => _detach = detach;

    internal void Deliver(QmpEvent e) => _queue.Writer.TryWrite(e);

    internal void Complete(Exception? error) => _queue.Writer.TryComplete(error);

    /// <summary>The events, in arrival order; ends when the connection closes.</summary>
    public IAsyncEnumerable<QmpEvent> ReadAllAsync(CancellationToken cancellationToken = default) =>
        _queue.Reader.ReadAllAsync(cancellationToken);

    /// <summary>The next event; throws <see cref="QmpConnectionException"/> if the connection closed first.</summary>
    public async ValueTask<QmpEvent> NextAsync(CancellationToken cancellationToken = default)
    {
        try
        {
            return await _queue.Reader.ReadAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (ChannelClosedException e)
        {
            throw new QmpConnectionException("the QMP connection closed", e);
        }
    }

    /// <summary>An event already received, if any, without waiting.</summary>
    public bool TryNext(out QmpEvent? e) => _queue.Reader.TryRead(out e);

    /// <summary>
    /// Waits for the first event that matches <paramref name="predicate"/>; the events before it are taken
    /// off this listener. Throws <see cref="TimeoutException"/> after <paramref name="timeout"/>.
    /// </summary>
    public async Task<QmpEvent> WaitForAsync(Func<QmpEvent, bool> predicate, TimeSpan timeout, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(predicate);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        cts.CancelAfter(timeout);
        try
        {
            while (true)
            {
                var e = await NextAsync(cts.Token).ConfigureAwait(false);
                if (predicate(e))
                {
                    return e;
                }
            }
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new TimeoutException($"no matching QMP event within {timeout.TotalSeconds:0.###} s");
        }
    }

    /// <summary>Waits for the named event whose data match <paramref name="predicate"/> (if given).</summary>
    public Task<QmpEvent> WaitForAsync(string name, TimeSpan timeout, Func<QmpEvent, bool>? predicate = null,
        CancellationToken cancellationToken = default) =>
        WaitForAsync(e => e.Name == name && (predicate is null || predicate(e)), timeout, cancellationToken);

    public void Dispose()
    {
        _detach(this);
        _queue.Writer.TryComplete();
    }
}
