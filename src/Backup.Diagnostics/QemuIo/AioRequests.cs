namespace Backup.Diagnostics.QemuIo;

/// <summary>
/// The aio_read/aio_write requests still running; aio_flush waits for all of them (QEMU's blk_drain_all).
/// A request runs on the thread pool, outside any QMP command, so a later command can resume it at a breakpoint.
/// </summary>
public sealed class AioRequests
{
    private readonly Lock _lock = new();
    private readonly HashSet<Task> _running = [];

    public int Count
    {
        get
        {
            lock (_lock)
            {
                return _running.Count;
            }
        }
    }

    /// <summary>Starts <paramref name="request"/> in the background and remembers it until it ends.</summary>
    public void Start(Func<Task> request)
    {
        ArgumentNullException.ThrowIfNull(request);
        var task = Task.Run(request);
        lock (_lock)
        {
            _running.Add(task);
        }
        _ = task.ContinueWith(t => Forget(t), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
    }

    /// <summary>Waits until no request is running, including those started while waiting.</summary>
    public async Task DrainAsync(CancellationToken cancellationToken)
    {
        while (true)
        {
            Task[] running;
            lock (_lock)
            {
                running = [.. _running];
            }
            if (running.Length == 0)
            {
                return;
            }
            await Task.WhenAll(running).WaitAsync(cancellationToken).ConfigureAwait(false);
        }
    }

    private void Forget(Task task)
    {
        lock (_lock)
        {
            _running.Remove(task);
        }
    }
}
