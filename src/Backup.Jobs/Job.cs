using System.Diagnostics;
using Backup.Block;
using Microsoft.Extensions.Logging;

namespace Backup.Jobs;

/// <summary>A job's start-up settings common to every kind (QEMU's JobCreateFlags and speed).</summary>
public sealed record JobSettings(string Id, bool AutoFinalize = true, bool AutoDismiss = true, long Speed = 0);

/// <summary>The job failed; the message is what BLOCK_JOB_COMPLETED carries in <c>error</c>.</summary>
public sealed class JobFailedException : Exception
{
    public JobFailedException(string message) : base(message) { }

    public JobFailedException(string message, Exception innerException) : base(message, innerException) { }

    public JobFailedException() : base("Job failed") { }
}

/// <summary>
/// One background job with QEMU's life cycle: created → running (⇄ paused) → waiting → pending →
/// concluded → null on success; → aborting → concluded → null on failure or cancel. Every state
/// change and event happens under the manager's lock, so events come out in QSD's order. The work
/// (<see cref="RunAsync"/>) runs on the thread pool, outside the QMP command lock; it calls
/// <see cref="PausePointAsync"/> and <see cref="RateLimitAsync"/> between units of work.
/// </summary>
// CA1001: the CancellationTokenSource has no timer and is never linked, so it holds nothing to release;
// a job's references end with its task.
#pragma warning disable CA1001
public abstract class Job
#pragma warning restore CA1001
{
    private readonly CancellationTokenSource _cancel = new();
    private readonly RateLimit _limit = new();
    private TaskCompletionSource _kick = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _pauseCount;
    private long _progressCurrent;
    private long _progressTotal;
    private Task _task = Task.CompletedTask;
    private long _startedAt;

    protected Job(JobManager manager, JobSettings settings)
    {
        ArgumentNullException.ThrowIfNull(manager);
        ArgumentNullException.ThrowIfNull(settings);
        Manager = manager;
        Id = settings.Id;
        AutoFinalize = settings.AutoFinalize;
        AutoDismiss = settings.AutoDismiss;
        Speed = settings.Speed;
        _limit.SetSpeed(settings.Speed);
    }

    public JobManager Manager { get; }

    public string Id { get; }

    /// <summary>The JobType wire name ("backup").</summary>
    public abstract string Type { get; }

    /// <summary>
    /// Block jobs (backup) also emit BLOCK_JOB_* events and are listed by query-block-jobs and found by
    /// block-job-*; plain jobs (blockdev-create) have only JOB_STATUS_CHANGE, as in QEMU.
    /// </summary>
    public virtual bool IsBlockJob => true;

    public JobStatus Status { get; private set; } = JobStatus.Undefined;

    public bool AutoFinalize { get; }

    public bool AutoDismiss { get; }

    public long Speed { get; private set; }

    public bool UserPaused { get; private set; }

    public bool IsCancelled { get; private set; }

    /// <summary>False while the job sleeps (rate limit) or is paused.</summary>
    public bool Busy { get; private set; } = true;

    /// <summary>ok, failed or nospace (set by an error with action stop).</summary>
    public string IoStatus { get; private set; } = "ok";

    /// <summary>Why the job failed (or "Operation canceled"), once it aborted.</summary>
    public string? Error { get; private set; }

    public long ProgressCurrent => Interlocked.Read(ref _progressCurrent);

    public long ProgressTotal => Interlocked.Read(ref _progressTotal);

    /// <summary>Completes when the job's work has ended (not when it is dismissed).</summary>
    public Task Completion => _task;

    protected Lock Sync => Manager.Sync;

    // ------------------------------------------------------------------ for subclasses

    /// <summary>The job's work. Throw <see cref="JobFailedException"/> to fail; cancellation surfaces as <see cref="OperationCanceledException"/>.</summary>
    protected abstract Task RunAsync(CancellationToken cancellationToken);

    /// <summary>After success, at finalize (under the manager lock): make the result visible (e.g. update the bitmap).</summary>
    protected virtual void Commit() { }

    /// <summary>After failure or cancel (under the manager lock): undo.</summary>
    protected virtual void Abort() { }

    /// <summary>After commit or abort (under the manager lock): release what the job holds.</summary>
    protected virtual void Clean() { }

    /// <summary>Runs in the job's task after <see cref="RunAsync"/> ended, outside the lock (e.g. wait for in-flight I/O).</summary>
    protected virtual ValueTask AfterRunAsync() => ValueTask.CompletedTask;

    /// <summary>The node the job works on, for the log (a backup's source).</summary>
    protected virtual string? NodeName => null;

    /// <summary>What the job does, in a few words for the log (a backup: sync mode, target, bitmap).</summary>
    protected virtual string Details => "";

    protected void AddProgress(long bytes)
    {
        var now = Interlocked.Add(ref _progressCurrent, bytes);
        var total = Interlocked.Read(ref _progressTotal);
        if (total <= 0 || bytes <= 0)
        {
            return;
        }
        // A line at each quarter passed (25, 50, 75 %): few enough for a log, enough to see a job move.
        var before = Quarter(now - bytes, total);
        var after = Quarter(now, total);
        if (after > before && after < 4 && Manager.Logger.IsEnabled(LogLevel.Information))
        {
            Manager.Logger.LogInformation("job {JobId} on node {Node}: {Percent}% ({Bytes} of {TotalBytes} bytes)",
                Id, NodeName, after * 25, now, total);
        }
    }

    private static long Quarter(long done, long total) => (long)((Int128)done * 4 / total);

    protected void SetProgressTotal(long bytes) => Interlocked.Exchange(ref _progressTotal, bytes);

    /// <summary>Where the job may pause: waits while paused; throws if cancelled.</summary>
    protected async ValueTask PausePointAsync()
    {
        while (true)
        {
            Task wait;
            lock (Sync)
            {
                if (_pauseCount > 0 && !IsCancelled)
                {
                    if (Status == JobStatus.Running)
                    {
                        Transition(JobStatus.Paused);
                    }
                    Busy = false;
                    wait = _kick.Task;
                }
                else
                {
                    if (Status == JobStatus.Paused)
                    {
                        Transition(JobStatus.Running);
                    }
                    Busy = true;
                    _cancel.Token.ThrowIfCancellationRequested();
                    return;
                }
            }
            await wait.ConfigureAwait(false);
        }
    }

    /// <summary>Accounts <paramref name="bytes"/> against the speed limit and sleeps as long as it says (QEMU's slices of 100 ms).</summary>
    protected async ValueTask RateLimitAsync(long bytes)
    {
        TimeSpan delay;
        lock (Sync)
        {
            delay = _limit.Delay(bytes);
        }
        if (delay > TimeSpan.Zero)
        {
            await SleepAsync(delay).ConfigureAwait(false);
        }
        await PausePointAsync().ConfigureAwait(false);
    }

    /// <summary>
    /// Counts <paramref name="bytes"/> that were moved without waiting (copy-before-write) against the speed
    /// limit: the job's own next <see cref="RateLimitAsync"/> waits for them, as QEMU's block-copy accounts
    /// the copies guest writes trigger.
    /// </summary>
    protected void AccountRate(long bytes)
    {
        lock (Sync)
        {
            _ = _limit.Delay(bytes);
        }
    }

    /// <summary>Sleeps (not busy) until the delay passes or the job is kicked (pause, cancel, speed change).</summary>
    protected async ValueTask SleepAsync(TimeSpan delay)
    {
        Task kick;
        lock (Sync)
        {
            // A cancel or pause that came after the caller's last pause point kicked the previous
            // wake-up, not this one: do not sleep through it.
            if (IsCancelled || _pauseCount > 0)
            {
                return;
            }
            Busy = false;
            kick = _kick.Task;
        }
        using var cts = new CancellationTokenSource();
        var timer = delay == Timeout.InfiniteTimeSpan ? Task.Delay(Timeout.Infinite, cts.Token) : Task.Delay(delay, cts.Token);
        await Task.WhenAny(timer, kick).ConfigureAwait(false);
        await cts.CancelAsync().ConfigureAwait(false);
        lock (Sync)
        {
            Busy = true;
        }
    }

    /// <summary>
    /// An I/O error met by the job: emits BLOCK_JOB_ERROR and returns true to retry (ignore, or stop then
    /// resumed), or throws <see cref="JobFailedException"/> (report).
    /// </summary>
    protected async ValueTask<bool> HandleErrorAsync(Exception error, bool isRead, string policy)
    {
        ArgumentNullException.ThrowIfNull(error);
        var errno = ErrnoOf(error);
        var action = policy switch
        {
            "ignore" => "ignore",
            "stop" => "stop",
            "enospc" => errno == 28 ? "stop" : "report",
            _ => "report",
        };
        Manager.Logger.LogWarning("job {JobId} on node {Node}: {Operation} error: {Error}; action {Action}",
            Id, NodeName, isRead ? "read" : "write", Describe(error), action);
        lock (Sync)
        {
            EmitBlockEvent("BLOCK_JOB_ERROR", [new("device", Id), new("operation", isRead ? "read" : "write"), new("action", action)]);
            if (action == "stop")
            {
                if (!UserPaused)
                {
                    UserPaused = true;
                    _pauseCount++;
                }
                IoStatus = errno == 28 ? "nospace" : "failed";
            }
        }
        switch (action)
        {
            case "report":
                throw new JobFailedException(Describe(error), error);
            case "stop":
                await PausePointAsync().ConfigureAwait(false);
                return true;
            default:
                return true;
        }
    }

    /// <summary>strerror text for an I/O failure, as QEMU puts it in the job's error.</summary>
    public static string Describe(Exception error)
    {
        ArgumentNullException.ThrowIfNull(error);
        return error is BlockException or JobFailedException ? error.Message : Block.Posix.LibC.Describe(ErrnoOf(error));
    }

    private static int ErrnoOf(Exception e) => Block.Posix.LibC.ErrnoOf(e);

    // ------------------------------------------------------------------ life cycle (manager lock held)

    internal void TransitionLocked(JobStatus to) => Transition(to);

    private void Transition(JobStatus to)
    {
        if (Status != JobStatus.Undefined && !JobRules.CanTransition(Status, to))
        {
            throw new InvalidOperationException($"job '{Id}': illegal transition {Status} -> {to}");
        }
        Status = to;
        Manager.Emit("JOB_STATUS_CHANGE", [new("id", Id), new("status", to.WireName())]);
    }

    /// <summary>created → running; the work starts on the thread pool.</summary>
    internal void StartLocked()
    {
        if (Status != JobStatus.Created)
        {
            throw new InvalidOperationException($"job '{Id}' cannot start in state {Status}");
        }
        Transition(JobStatus.Running);
        _startedAt = Stopwatch.GetTimestamp();
        Manager.Logger.LogInformation("job {JobId} ({JobType}) started on node {Node}: {Details}; {TotalBytes} bytes to copy",
            Id, Type, NodeName, Details, ProgressTotal);
        _task = Task.Run(RunWrapperAsync);
    }

    private async Task RunWrapperAsync()
    {
        string? error = null;
        try
        {
            await RunAsync(_cancel.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (IsCancelled)
        {
        }
        catch (JobFailedException e)
        {
            error = e.Message;
        }
#pragma warning disable CA1031 // A job's failure of any kind is reported to the client, not thrown.
        catch (Exception e)
#pragma warning restore CA1031
        {
            error = Describe(e);
        }
        try
        {
            await AfterRunAsync().ConfigureAwait(false);
        }
#pragma warning disable CA1031
        catch (Exception e)
#pragma warning restore CA1031
        {
            error ??= Describe(e);
        }
        lock (Sync)
        {
            if (error is not null || IsCancelled)
            {
                AbortLocked(error);
                Group?.MemberAbortedLocked(this);
                return;
            }
            Transition(JobStatus.Waiting);
            if (Group is { } group)
            {
                // Grouped completion: the group moves every member on once all have finished.
                group.MemberWaitingLocked(this);
                return;
            }
            ProceedFromWaitingLocked();
        }
    }

    /// <summary>waiting → pending, then finalize unless auto-finalize is off.</summary>
    internal void ProceedFromWaitingLocked()
    {
        Transition(JobStatus.Pending);
        if (!AutoFinalize)
        {
            EmitBlockEvent("BLOCK_JOB_PENDING", [new("type", Type), new("id", Id)]);
            return;
        }
        FinalizeLocked();
    }

    /// <summary>The transaction group this job completes with (completion-mode grouped), if any.</summary>
    internal JobGroup? Group { get; set; }

    private void AbortLocked(string? error)
    {
        Error = error ?? "Operation canceled";
        Transition(JobStatus.Aborting);
        Abort();
        Clean();
        if (IsCancelled)
        {
            Manager.Logger.LogInformation("job {JobId} ({JobType}) on node {Node} cancelled after {Bytes} of {TotalBytes} bytes",
                Id, Type, NodeName, ProgressCurrent, ProgressTotal);
            EmitBlockEvent("BLOCK_JOB_CANCELLED", BlockEventData());
        }
        else
        {
            Manager.Logger.LogWarning("job {JobId} ({JobType}) on node {Node} failed after {Bytes} of {TotalBytes} bytes: {Error}",
                Id, Type, NodeName, ProgressCurrent, ProgressTotal, Error);
            var data = BlockEventData();
            data.Add(new("error", Error));
            EmitBlockEvent("BLOCK_JOB_COMPLETED", data);
        }
        ConcludeLocked();
    }

    private void FinalizeLocked()
    {
        Commit();
        Clean();
        Manager.Logger.LogInformation("job {JobId} ({JobType}) on node {Node} completed: {Bytes} bytes in {ElapsedMs} ms",
            Id, Type, NodeName, ProgressCurrent, (long)Stopwatch.GetElapsedTime(_startedAt).TotalMilliseconds);
        EmitBlockEvent("BLOCK_JOB_COMPLETED", BlockEventData());
        ConcludeLocked();
    }

    private void ConcludeLocked()
    {
        Transition(JobStatus.Concluded);
        if (AutoDismiss)
        {
            DismissLocked();
        }
    }

    private void DismissLocked()
    {
        Transition(JobStatus.Null);
        Manager.RemoveLocked(this);
    }

    private void EmitBlockEvent(string name, List<KeyValuePair<string, object?>> data)
    {
        if (IsBlockJob)
        {
            Manager.Emit(name, data);
        }
    }

    private List<KeyValuePair<string, object?>> BlockEventData() =>
    [
        new("type", Type),
        new("device", Id),
        new("len", ProgressTotal),
        new("offset", ProgressCurrent),
        new("speed", Speed),
    ];

    private void Kick()
    {
        var k = _kick;
        _kick = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        k.TrySetResult();
    }

    // ------------------------------------------------------------------ verbs (QMP, under the manager lock)

    private void CheckVerb(JobVerb verb)
    {
        if (!JobRules.Allows(verb, Status))
        {
            throw new BlockException($"Job '{Id}' in state '{Status.WireName()}' cannot accept command verb '{verb.WireName()}'");
        }
    }

    public void Pause()
    {
        lock (Sync)
        {
            CheckVerb(JobVerb.Pause);
            if (UserPaused)
            {
                throw new BlockException("Job is already paused");
            }
            UserPaused = true;
            _pauseCount++;
            Manager.Logger.LogInformation("job {JobId} on node {Node}: paused by the user", Id, NodeName);
            Kick();
        }
    }

    public void Resume()
    {
        lock (Sync)
        {
            CheckVerb(JobVerb.Resume);
            if (!UserPaused || _pauseCount <= 0)
            {
                throw new BlockException("Can't resume a job that was not paused");
            }
            UserPaused = false;
            _pauseCount--;
            IoStatus = "ok";
            Manager.Logger.LogInformation("job {JobId} on node {Node}: resumed", Id, NodeName);
            Kick();
        }
    }

    /// <summary>block-job-cancel refuses a user-paused job unless forced; job-cancel forces.</summary>
    public void Cancel(bool force)
    {
        lock (Sync)
        {
            if (UserPaused && !force)
            {
                throw new BlockException($"The block job for device '{Id}' is currently paused");
            }
            CheckVerb(JobVerb.Cancel);
            CancelLocked();
        }
    }

    internal void CancelLocked()
    {
        if (IsCancelled || Status is JobStatus.Aborting or JobStatus.Concluded or JobStatus.Null)
        {
            return;
        }
        if (Status == JobStatus.Created)
        {
            AbortUnstartedLocked();
            return;
        }
        IsCancelled = true;
        if (Status is JobStatus.Waiting or JobStatus.Pending)
        {
            // The work is done; abort at once.
            AbortLocked(null);
            Group?.MemberAbortedLocked(this);
            return;
        }
        if (UserPaused)
        {
            UserPaused = false;
            _pauseCount--;
        }
        _cancel.Cancel();
        Kick();
    }

    /// <summary>
    /// A transaction aborted after its prepare step created this job: created → aborting → concluded →
    /// null, undoing what creation did; no BLOCK_JOB_* event, as QEMU emits those only for started jobs.
    /// </summary>
    public void AbortUnstarted()
    {
        lock (Sync)
        {
            if (Status != JobStatus.Created)
            {
                throw new InvalidOperationException($"job '{Id}' was started");
            }
            AbortUnstartedLocked();
        }
    }

    private void AbortUnstartedLocked()
    {
        Manager.Logger.LogDebug("job {JobId} ({JobType}) on node {Node} dropped before it started", Id, Type, NodeName);
        IsCancelled = true;
        Error = "Operation canceled";
        Transition(JobStatus.Aborting);
        Abort();
        Clean();
        Transition(JobStatus.Concluded);
        DismissLocked();
    }

    public void SetSpeed(long speed)
    {
        lock (Sync)
        {
            CheckVerb(JobVerb.SetSpeed);
            if (speed < 0)
            {
                throw new BlockException("Parameter 'speed' expects a non-negative value");
            }
            Speed = speed;
            _limit.SetSpeed(speed);
            Kick();
        }
    }

    public void Complete()
    {
        lock (Sync)
        {
            CheckVerb(JobVerb.Complete);
            throw new BlockException($"The active block job '{Id}' cannot be completed");
        }
    }

    public void FinalizeJob()
    {
        lock (Sync)
        {
            CheckVerb(JobVerb.Finalize);
            FinalizeLocked();
        }
    }

    public void Dismiss()
    {
        lock (Sync)
        {
            CheckVerb(JobVerb.Dismiss);
            DismissLocked();
        }
    }

    public override string ToString() => $"{Type} job '{Id}' ({Status.WireName()})";
}

/// <summary>QEMU's RateLimit: a quota per 100 ms slice; going over it delays by the excess.</summary>
internal sealed class RateLimit
{
    private static readonly long s_sliceTicks = TimeSpan.FromMilliseconds(100).Ticks;
    private long _sliceQuota;
    private long _sliceStart;
    private long _sliceEnd;
    private long _dispatched;

    public void SetSpeed(long bytesPerSecond) =>
        _sliceQuota = bytesPerSecond <= 0 ? 0 : Math.Max(1, (long)((double)bytesPerSecond * s_sliceTicks / TimeSpan.TicksPerSecond));

    public TimeSpan Delay(long bytes)
    {
        if (_sliceQuota == 0)
        {
            return TimeSpan.Zero;
        }
        var now = DateTime.UtcNow.Ticks;
        if (_sliceEnd < now)
        {
            _sliceStart = now;
            _sliceEnd = now + s_sliceTicks;
            _dispatched = 0;
        }
        _dispatched += bytes;
        if (_dispatched < _sliceQuota)
        {
            return TimeSpan.Zero;
        }
        var slices = (double)_dispatched / _sliceQuota;
        _sliceEnd = _sliceStart + (long)(slices * s_sliceTicks);
        return TimeSpan.FromTicks(Math.Max(0, _sliceEnd - now));
    }
}
