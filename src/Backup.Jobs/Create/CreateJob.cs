namespace Backup.Jobs.Create;

/// <summary>
/// blockdev-create's job (JobType "create"): a plain job, not a block job, so it emits only
/// JOB_STATUS_CHANGE and is not listed by query-block-jobs. As in QEMU it is auto-finalized but not
/// auto-dismissed (the client reads the outcome with query-jobs, then job-dismiss), and its progress
/// goes from 0/1 to 1/1 when the work ends, whether it failed or not.
/// </summary>
public sealed class CreateJob : Job
{
    private readonly ImageCreation _creation;

    public CreateJob(JobManager manager, string id, ImageCreation creation)
        : base(manager, new JobSettings(id, AutoFinalize: true, AutoDismiss: false))
    {
        ArgumentNullException.ThrowIfNull(creation);
        _creation = creation;
    }

    public override string Type => "create";

    public override bool IsBlockJob => false;

    protected override string Details => _creation.Description;

    protected override async Task RunAsync(CancellationToken cancellationToken)
    {
        SetProgressTotal(1);
        try
        {
            await _creation.RunAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            AddProgress(1);
        }
    }
}
