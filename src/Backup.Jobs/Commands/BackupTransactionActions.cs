using System.Text.Json.Nodes;
using Backup.Qmp.Transactions;

namespace Backup.Jobs.Commands;

/// <summary>
/// drive-backup and blockdev-backup as transaction actions: prepare takes the point in time (bitmap
/// frozen, copy-before-write in place) and registers the job (created); commit runs it; abort discards
/// it (created aborting concluded null, as QSD reports it) and gives the bitmap back untouched.
/// </summary>
public sealed class BackupTransactionActions(BackupStarter starter, JobManager jobs) : ITransactionActionModule
{
    public void Register(TransactionActionTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("blockdev-backup", (data, context) => new Action(context, jobs, _ =>
            Task.FromResult(starter.PrepareBlockdevBackup(BackupCommands.BindBlockdev(data)))));
        table.Add("drive-backup", (data, context) => new Action(context, jobs, ct =>
            starter.PrepareDriveBackupAsync(BackupCommands.BindDrive(data), ct)));
    }

    private sealed class Action(TransactionContext context, JobManager jobs, Func<CancellationToken, Task<BackupJob>> prepare) : ITransactionAction
    {
        private BackupJob? _job;

        public async ValueTask PrepareAsync(CancellationToken cancellationToken)
        {
            var job = await prepare(cancellationToken).ConfigureAwait(false);
            jobs.Register(job);
            _job = job;
            if (context.Grouped)
            {
                context.Shared(() => new JobGroup()).Add(job);
            }
        }

        public void Commit()
        {
            if (_job is { } job)
            {
                jobs.Run(job);
            }
        }

        public void Abort()
        {
            if (_job is { } job)
            {
                job.AbortUnstarted();
            }
        }

        public void Clean() { }
    }
}
