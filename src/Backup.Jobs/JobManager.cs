using Backup.Block;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace Backup.Jobs;

/// <summary>
/// Every job that has not been dismissed, by id, in creation order; the lock that orders their state
/// changes and events; and the rules for job ids. Jobs log their life (start, progress by quarters,
/// completion, failure, cancel) through its logger, with the job id and node as properties.
/// </summary>
public sealed class JobManager(Func<IEventSink> events, ILogger<JobManager>? logger = null)
{
    private readonly List<Job> _jobs = [];

    internal ILogger Logger { get; } = (ILogger?)logger ?? NullLogger.Instance;

    internal Lock Sync { get; } = new();

    public IReadOnlyList<Job> Jobs
    {
        get
        {
            lock (Sync)
            {
                return [.. _jobs];
            }
        }
    }

    public Job? Find(string id)
    {
        lock (Sync)
        {
            return _jobs.Find(j => j.Id == id);
        }
    }

    /// <summary>For job-*: GenericError "Job not found".</summary>
    public Job Get(string id) => Find(id) ?? throw new BlockException("Job not found");

    /// <summary>For block-job-*: DeviceNotActive "Block job 'X' not found".</summary>
    public Job GetBlockJob(string id) =>
        Find(id) is { IsBlockJob: true } job ? job : throw new BlockException($"Block job '{id}' not found", ErrorClass.DeviceNotActive);

    /// <summary>QEMU's id checks: well-formed ("Invalid job ID 'x'"; no id at all is '') and unused.</summary>
    public void CheckNewId(string? id)
    {
        id ??= "";
        if (!Identifier.IsWellFormed(id))
        {
            throw new BlockException($"Invalid job ID '{id}'");
        }
        if (Find(id) is not null)
        {
            throw new BlockException($"Job ID '{id}' already in use");
        }
    }

    /// <summary>Registers a new job (JOB_STATUS_CHANGE created) and starts it (running).</summary>
    public void Start(Job job)
    {
        Register(job);
        Run(job);
    }

    /// <summary>A transaction's prepare: the job exists (created) but does not run yet.</summary>
    public void Register(Job job)
    {
        ArgumentNullException.ThrowIfNull(job);
        lock (Sync)
        {
            if (_jobs.Exists(j => j.Id == job.Id))
            {
                throw new BlockException($"Job ID '{job.Id}' already in use");
            }
            _jobs.Add(job);
            job.TransitionLocked(JobStatus.Created);
        }
    }

    /// <summary>A transaction's commit: created → running.</summary>
    public void Run(Job job)
    {
        ArgumentNullException.ThrowIfNull(job);
        lock (Sync)
        {
            job.StartLocked();
        }
    }


    /// <summary>Daemon shutdown: cancels every job that can be and waits (bounded) for their work to end.</summary>
    public async Task CancelAllAsync(TimeSpan timeout)
    {
        List<Job> jobs;
        lock (Sync)
        {
            jobs = [.. _jobs];
            foreach (var j in jobs)
            {
                j.CancelLocked();
            }
        }
        var all = Task.WhenAll(jobs.Select(j => j.Completion));
        await Task.WhenAny(all, Task.Delay(timeout)).ConfigureAwait(false);
    }

    internal void RemoveLocked(Job job) => _jobs.Remove(job);

    internal void Emit(string name, IReadOnlyList<KeyValuePair<string, object?>> data) => events().Emit(name, data);
}
