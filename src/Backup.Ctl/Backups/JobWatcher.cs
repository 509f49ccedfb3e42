using System.Text.Json.Nodes;
using Backup.Qmp.Client;

namespace Backup.Ctl.Backups;

/// <summary>How one backup job ended.</summary>
/// <param name="Copied">BLOCK_JOB_COMPLETED's <c>len</c>.</param>
/// <param name="Error">The job's error, or "cancelled"; null on success.</param>
public sealed record JobOutcome(long Copied, string? Error);

/// <summary>
/// Follows backup jobs from their events until each is gone (JOB_STATUS_CHANGE null), polling query-jobs a few
/// times a second for the progress bars.
/// </summary>
public static class JobWatcher
{
    public static async Task<Dictionary<string, JobOutcome>> WatchAsync(QmpClient qmp, QmpEventListener events,
        IReadOnlyCollection<string> jobIds, Action<string, long, long>? progress, CancellationToken cancellationToken)
    {
        var remaining = new HashSet<string>(jobIds, StringComparer.Ordinal);
        var outcomes = new Dictionary<string, JobOutcome>(StringComparer.Ordinal);
        var nextPoll = DateTime.UtcNow;
        while (remaining.Count > 0)
        {
            while (events.TryNext(out var e))
            {
                Note(e!, remaining, outcomes);
            }
            if (remaining.Count == 0)
            {
                break;
            }
            if (progress is not null && DateTime.UtcNow >= nextPoll)
            {
                var jobs = await qmp.ExecuteAsync("query-jobs", null, cancellationToken).ConfigureAwait(false);
                foreach (var job in jobs?.AsArray().OfType<JsonObject>() ?? [])
                {
                    var id = job["id"]?.GetValue<string>();
                    if (id is not null && remaining.Contains(id))
                    {
                        progress(id, job["current-progress"]?.GetValue<long>() ?? 0, job["total-progress"]?.GetValue<long>() ?? 0);
                    }
                }
                nextPoll = DateTime.UtcNow.AddMilliseconds(250);
            }
            try
            {
                var e = await events.WaitForAsync(_ => true, TimeSpan.FromMilliseconds(250), cancellationToken).ConfigureAwait(false);
                Note(e, remaining, outcomes);
            }
            catch (TimeoutException)
            {
            }
        }
        foreach (var id in jobIds)
        {
            // A job that vanished without a completion event never ran to an end the daemon reported.
            outcomes.TryAdd(id, new JobOutcome(0, "the job ended without a completion event"));
        }
        return outcomes;
    }

    private static void Note(QmpEvent e, HashSet<string> remaining, Dictionary<string, JobOutcome> outcomes)
    {
        switch (e.Name)
        {
            case "BLOCK_JOB_COMPLETED" when e.GetString("device") is { } id && remaining.Contains(id):
                outcomes[id] = new JobOutcome(e.Data["len"]?.GetValue<long>() ?? 0, e.GetString("error"));
                break;
            case "BLOCK_JOB_CANCELLED" when e.GetString("device") is { } id && remaining.Contains(id):
                outcomes[id] = new JobOutcome(e.Data["len"]?.GetValue<long>() ?? 0, "cancelled");
                break;
            case "JOB_STATUS_CHANGE" when e.GetString("status") == "null" && e.GetString("id") is { } id:
                remaining.Remove(id);
                break;
        }
    }
}
