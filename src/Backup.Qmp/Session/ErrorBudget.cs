namespace Backup.Qmp.Session;

/// <summary>
/// A token bucket for input that is not even a request (bad JSON): each costs a token, and a session
/// out of tokens waits for the next one. Well-behaved clients never notice; a client spraying garbage
/// is held to <c>perSecond</c> error replies a second, so it cannot take the CPU from other sessions.
/// </summary>
public sealed class ErrorBudget(int perSecond, TimeProvider? time = null)
{
    private readonly TimeProvider _time = time ?? TimeProvider.System;
    private double _tokens = perSecond;
    private long _last = (time ?? TimeProvider.System).GetTimestamp();

    /// <summary>Spends a token; returns how long the caller must wait before going on (zero while tokens last).</summary>
    public TimeSpan Take()
    {
        var now = _time.GetTimestamp();
        _tokens = Math.Min(perSecond, _tokens + _time.GetElapsedTime(_last, now).TotalSeconds * perSecond);
        _last = now;
        _tokens -= 1;
        return _tokens >= 0 ? TimeSpan.Zero : TimeSpan.FromSeconds(-_tokens / perSecond);
    }

    public ValueTask WaitAsync(CancellationToken cancellationToken)
    {
        var wait = Take();
        return wait == TimeSpan.Zero ? ValueTask.CompletedTask : new ValueTask(Task.Delay(wait, _time, cancellationToken));
    }
}
