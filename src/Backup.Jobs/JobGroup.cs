namespace Backup.Jobs;

/// <summary>
/// The jobs of one transaction with completion-mode grouped (QEMU's JobTxn): a member that finishes
/// its work waits; when all have finished, all move on to pending together; when one fails or is
/// cancelled, every other member is cancelled, so each job's abort gives its bitmap back with the
/// writes made meanwhile, and a retry of the whole transaction covers everything. Called under the
/// job manager's lock.
/// </summary>
internal sealed class JobGroup
{
    private readonly List<Job> _members = [];
    private bool _aborting;

    public void Add(Job job)
    {
        ArgumentNullException.ThrowIfNull(job);
        _members.Add(job);
        job.Group = this;
    }

    public void MemberWaitingLocked(Job job)
    {
        if (_aborting || _members.Any(m => m.Status is not (JobStatus.Waiting or JobStatus.Pending or JobStatus.Concluded or JobStatus.Null)))
        {
            return;
        }
        foreach (var m in _members.Where(m => m.Status == JobStatus.Waiting).ToList())
        {
            m.ProceedFromWaitingLocked();
        }
    }

    public void MemberAbortedLocked(Job job)
    {
        if (_aborting)
        {
            return;
        }
        _aborting = true;
        foreach (var m in _members.Where(m => !ReferenceEquals(m, job)).ToList())
        {
            m.CancelLocked();
        }
    }
}
