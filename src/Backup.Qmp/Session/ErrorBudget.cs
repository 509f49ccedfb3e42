using System.Diagnostics;

namespace Backup.Qmp.Session;

/// <summary>
/// A token bucket for input that is not even a request (bad JSON): each costs a token, and a session
/// out of tokens waits for the next one. Well-behaved clients never notice; a client spraying garbage
/// is held to <c>perSecond</c> error replies a second, so it cannot take the CPU from other sessions.
/// </summary>
public sealed class ErrorBudget(int perSecond)
{
    private readonly double _perTick = perSecond / (double)Stopwatch.Frequency;
    private double _tokens = perSecond;
    private long _last = Stopwatch.GetTimestamp();

    public ValueTask WaitAsync(CancellationToken cancellationToken)
    {
        var now = Stopwatch.GetTimestamp();
        _tokens = Math.Min(perSecond, _tokens + (now - _last) * _perTick);
        _last = now;
        _tokens -= 1;
        if (_tokens >= 0)
        {
            return ValueTask.CompletedTask;
        }
        var wait = TimeSpan.FromSeconds(-_tokens / perSecond);
        return new ValueTask(Task.Delay(wait, cancellationToken));
    }
}
