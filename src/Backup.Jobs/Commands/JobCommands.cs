using System.Text.Json.Nodes;
using Backup.Qmp.Commands;

namespace Backup.Jobs.Commands;

/// <summary>query-jobs, query-block-jobs, job-* and block-job-* (schemas/jobs.json): bind and call <see cref="Job"/>.</summary>
public sealed class JobCommands(JobManager jobs) : ICommandModule
{
    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        // Newest first, as QEMU lists them (its job list inserts at the head).
        table.Add("query-jobs", (_, _, _) => Result(new JsonArray([.. jobs.Jobs.Reverse().Select(JobInfo)])));
        table.Add("query-block-jobs", (_, _, _) =>
            Result(new JsonArray([.. jobs.Jobs.Reverse().Where(j => j.IsBlockJob).Select(BlockJobInfo)])));
        table.Add("job-pause", (a, _, _) => Done(() => jobs.Get(Id(a)).Pause()));
        table.Add("job-resume", (a, _, _) => Done(() => jobs.Get(Id(a)).Resume()));
        table.Add("job-cancel", (a, _, _) => Done(() => jobs.Get(Id(a)).Cancel(force: true)));
        table.Add("job-complete", (a, _, _) => Done(() => jobs.Get(Id(a)).Complete()));
        table.Add("job-finalize", (a, _, _) => Done(() => jobs.Get(Id(a)).FinalizeJob()));
        table.Add("job-dismiss", (a, _, _) => Done(() => jobs.Get(Id(a)).Dismiss()));
        table.Add("block-job-pause", (a, _, _) => Done(() => jobs.GetBlockJob(Device(a)).Pause()));
        table.Add("block-job-resume", (a, _, _) => Done(() => jobs.GetBlockJob(Device(a)).Resume()));
        table.Add("block-job-cancel", (a, _, _) =>
            Done(() => jobs.GetBlockJob(Device(a)).Cancel(a["force"]?.GetValue<bool>() ?? false)));
        table.Add("block-job-complete", (a, _, _) => Done(() => jobs.GetBlockJob(Device(a)).Complete()));
        table.Add("block-job-finalize", (a, _, _) => Done(() => jobs.GetBlockJob(Id(a)).FinalizeJob()));
        table.Add("block-job-dismiss", (a, _, _) => Done(() => jobs.GetBlockJob(Id(a)).Dismiss()));
        table.Add("block-job-set-speed", (a, _, _) =>
            Done(() => jobs.GetBlockJob(Device(a)).SetSpeed(a["speed"]!.GetValue<long>())));
    }

    private static JsonObject JobInfo(Job j)
    {
        var o = new JsonObject
        {
            ["id"] = j.Id,
            ["type"] = j.Type,
            ["status"] = j.Status.WireName(),
            ["current-progress"] = j.ProgressCurrent,
            ["total-progress"] = j.ProgressTotal,
        };
        if (j.Status == JobStatus.Concluded && j.Error is { } e)
        {
            o["error"] = e;
        }
        return o;
    }

    private static JsonObject BlockJobInfo(Job j)
    {
        var o = new JsonObject
        {
            ["type"] = j.Type,
            ["device"] = j.Id,
            ["len"] = j.ProgressTotal,
            ["offset"] = j.ProgressCurrent,
            ["busy"] = j.Busy && j.Status == JobStatus.Running,
            ["paused"] = j.UserPaused,
            ["speed"] = j.Speed,
            ["io-status"] = j.IoStatus,
            ["ready"] = j.Status == JobStatus.Ready,
            ["status"] = j.Status.WireName(),
            ["auto-finalize"] = j.AutoFinalize,
            ["auto-dismiss"] = j.AutoDismiss,
        };
        if (j.Status == JobStatus.Concluded && j.Error is { } e)
        {
            o["error"] = e;
        }
        return o;
    }

    private static string Id(JsonObject a) => a["id"]!.GetValue<string>();

    private static string Device(JsonObject a) => a["device"]!.GetValue<string>();

    private static ValueTask<JsonNode?> Result(JsonNode node) => ValueTask.FromResult<JsonNode?>(node);

    private static ValueTask<JsonNode?> Done(Action action)
    {
        action();
        return ValueTask.FromResult<JsonNode?>(null);
    }
}
