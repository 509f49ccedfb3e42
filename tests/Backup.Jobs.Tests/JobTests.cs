using Backup.Block;

namespace Backup.Jobs.Tests;

public class JobTests
{
    /// <summary>A job whose work ends when the test says, failing or not.</summary>
    private sealed class TestJob(JobManager m, JobSettings s) : Job(m, s)
    {
        public TaskCompletionSource<string?> Finish { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public int Commits { get; private set; }

        public int Aborts { get; private set; }

        public override string Type => "backup";

        protected override async Task RunAsync(CancellationToken cancellationToken)
        {
            while (!Finish.Task.IsCompleted)
            {
                await PausePointAsync();
                await Task.WhenAny(Finish.Task, Task.Delay(5, CancellationToken.None));
            }
            await PausePointAsync();
            if (await Finish.Task is { } error)
            {
                throw new JobFailedException(error);
            }
        }

        protected override void Commit() => Commits++;

        protected override void Abort() => Aborts++;
    }

    private readonly EventLog _log = new();
    private readonly JobManager _jobs;

    public JobTests() => _jobs = new JobManager(() => _log);

    private TestJob Start(string id = "j1", bool autoFinalize = true, bool autoDismiss = true)
    {
        var job = new TestJob(_jobs, new JobSettings(id, autoFinalize, autoDismiss));
        _jobs.Start(job);
        return job;
    }

    [Theory]
    [InlineData(JobStatus.Created, JobStatus.Running, true)]
    [InlineData(JobStatus.Running, JobStatus.Paused, true)]
    [InlineData(JobStatus.Running, JobStatus.Pending, false)]
    [InlineData(JobStatus.Waiting, JobStatus.Pending, true)]
    [InlineData(JobStatus.Pending, JobStatus.Concluded, true)]
    [InlineData(JobStatus.Concluded, JobStatus.Null, true)]
    [InlineData(JobStatus.Concluded, JobStatus.Running, false)]
    [InlineData(JobStatus.Paused, JobStatus.Aborting, false)]
    public void Transition_table_is_QEMUs(JobStatus from, JobStatus to, bool allowed) =>
        JobRules.CanTransition(from, to).Should().Be(allowed);

    [Theory]
    [InlineData(JobVerb.Dismiss, JobStatus.Pending, false)]
    [InlineData(JobVerb.Dismiss, JobStatus.Concluded, true)]
    [InlineData(JobVerb.Finalize, JobStatus.Pending, true)]
    [InlineData(JobVerb.Finalize, JobStatus.Concluded, false)]
    [InlineData(JobVerb.Complete, JobStatus.Running, false)]
    [InlineData(JobVerb.Cancel, JobStatus.Paused, true)]
    [InlineData(JobVerb.Cancel, JobStatus.Concluded, false)]
    [InlineData(JobVerb.SetSpeed, JobStatus.Running, true)]
    public void Verb_table_is_QEMUs(JobVerb verb, JobStatus status, bool allowed) =>
        JobRules.Allows(verb, status).Should().Be(allowed);

    [Fact]
    public async Task Success_runs_the_whole_sequence_and_commits()
    {
        var job = Start();
        job.Finish.SetResult(null);
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("null", StringComparison.Ordinal));
        _log.Sequence("j1").Should().Be("created running waiting pending BLOCK_JOB_COMPLETED concluded null");
        job.Commits.Should().Be(1);
        _jobs.Jobs.Should().BeEmpty();
    }

    [Fact]
    public async Task Failure_aborts_and_reports_the_error()
    {
        var job = Start();
        job.Finish.SetResult("No space left on device");
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("null", StringComparison.Ordinal));
        _log.Sequence("j1").Should().Be("created running aborting BLOCK_JOB_COMPLETED concluded null");
        _log.Value("BLOCK_JOB_COMPLETED", "error").Should().Be("No space left on device");
        job.Aborts.Should().Be(1);
    }

    [Fact]
    public async Task Cancel_of_a_running_job()
    {
        var job = Start();
        _jobs.Get("j1").Cancel(force: true);
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("null", StringComparison.Ordinal));
        _log.Sequence("j1").Should().Be("created running aborting BLOCK_JOB_CANCELLED concluded null");
        job.Aborts.Should().Be(1);
    }

    [Fact]
    public async Task Paused_job_needs_force_for_block_job_cancel()
    {
        var job = Start("j2");
        job.Pause();
        await _log.WaitForAsync(l => l.Sequence("j2").EndsWith("paused", StringComparison.Ordinal));
        var act = () => _jobs.GetBlockJob("j2").Cancel(force: false);
        act.Should().Throw<BlockException>().WithMessage("The block job for device 'j2' is currently paused");
        ((Action)job.Pause).Should().Throw<BlockException>().WithMessage("Job is already paused");
        job.Cancel(force: true);
        await _log.WaitForAsync(l => l.Sequence("j2").EndsWith("null", StringComparison.Ordinal));
        _log.Sequence("j2").Should().Be("created running paused running aborting BLOCK_JOB_CANCELLED concluded null");
    }

    [Fact]
    public async Task Pause_and_resume()
    {
        var job = Start();
        ((Action)job.Resume).Should().Throw<BlockException>().WithMessage("Can't resume a job that was not paused");
        job.Pause();
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("paused", StringComparison.Ordinal));
        job.Resume();
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("paused running", StringComparison.Ordinal));
        job.Finish.SetResult(null);
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("null", StringComparison.Ordinal));
    }

    [Fact]
    public async Task Manual_finalize_and_dismiss()
    {
        var job = Start(autoFinalize: false, autoDismiss: false);
        job.Finish.SetResult(null);
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("BLOCK_JOB_PENDING", StringComparison.Ordinal));
        job.Commits.Should().Be(0);
        ((Action)job.Dismiss).Should().Throw<BlockException>().WithMessage("Job 'j1' in state 'pending' cannot accept command verb 'dismiss'");
        ((Action)job.Complete).Should().Throw<BlockException>().WithMessage("Job 'j1' in state 'pending' cannot accept command verb 'complete'");
        job.FinalizeJob();
        job.Commits.Should().Be(1);
        job.Status.Should().Be(JobStatus.Concluded);
        ((Action)job.FinalizeJob).Should().Throw<BlockException>().WithMessage("Job 'j1' in state 'concluded' cannot accept command verb 'finalize'");
        job.Dismiss();
        _log.Sequence("j1").Should().Be("created running waiting pending BLOCK_JOB_PENDING BLOCK_JOB_COMPLETED concluded null");
        _jobs.Jobs.Should().BeEmpty();
    }

    [Fact]
    public void Job_ids_follow_QEMUs_rules()
    {
        var start = () => _jobs.CheckNewId(null);
        start.Should().Throw<BlockException>().WithMessage("Invalid job ID ''");
        start = () => _jobs.CheckNewId("1-bad id");
        start.Should().Throw<BlockException>().WithMessage("Invalid job ID '1-bad id'");
        Start("j0");
        start = () => _jobs.CheckNewId("j0");
        start.Should().Throw<BlockException>().WithMessage("Job ID 'j0' already in use");
        var find = () => _jobs.Get("nope");
        find.Should().Throw<BlockException>().WithMessage("Job not found");
        var block = () => _jobs.GetBlockJob("nope");
        block.Should().Throw<BlockException>().Which.ErrorClass.Should().Be(ErrorClass.DeviceNotActive);
    }

    [Fact]
    public async Task Negative_speed_is_refused_and_speed_is_reported()
    {
        var job = Start();
        var act = () => job.SetSpeed(-5);
        act.Should().Throw<BlockException>().WithMessage("Parameter 'speed' expects a non-negative value");
        job.SetSpeed(1 << 20);
        job.Speed.Should().Be(1 << 20);
        job.Finish.SetResult(null);
        await _log.WaitForAsync(l => l.Sequence("j1").EndsWith("null", StringComparison.Ordinal));
        _log.Value("BLOCK_JOB_COMPLETED", "speed").Should().Be(1L << 20);
    }
}
