using System.Text.Json.Nodes;
using Backup.Qmp.Client;

namespace Backup.Ctl.Backups;

/// <summary>The few facts backupctl asks the daemon for, each one QMP command.</summary>
public static class DaemonQueries
{
    /// <summary>query-named-block-nodes (flat): the node's entry, or an error naming it.</summary>
    public static async Task<JsonObject> NodeAsync(QmpClient qmp, string node, CancellationToken cancellationToken)
    {
        var nodes = await qmp.ExecuteAsync("query-named-block-nodes", new JsonObject { ["flat"] = true }, cancellationToken).ConfigureAwait(false);
        return nodes?.AsArray().OfType<JsonObject>().FirstOrDefault(n => n["node-name"]?.GetValue<string>() == node)
            ?? throw new CtlException($"no drive '{node}' in the daemon (see query-named-block-nodes)");
    }

    public static long VirtualSize(JsonObject node) =>
        node["image"]?["virtual-size"]?.GetValue<long>() ?? throw new CtlException($"node '{node["node-name"]}' reports no virtual size");

    /// <summary>The node's named dirty bitmaps (QMP's BlockDirtyInfo objects).</summary>
    public static IReadOnlyList<JsonObject> Bitmaps(JsonObject node) =>
        (node["dirty-bitmaps"] as JsonArray)?.OfType<JsonObject>().Where(b => b["name"] is not null).ToList() ?? [];

    public static JsonObject? Bitmap(JsonObject node, string name) =>
        Bitmaps(node).FirstOrDefault(b => b["name"]!.GetValue<string>() == name);

    /// <summary>
    /// Runs a blockdev-create job to its end and dismisses it. Its error (the job's, in QEMU's words) becomes a
    /// <see cref="CtlException"/>.
    /// </summary>
    public static async Task CreateImageAsync(QmpClient qmp, string jobId, JsonObject options, CancellationToken cancellationToken)
    {
        using var events = qmp.Listen();
        await qmp.ExecuteAsync("blockdev-create", new JsonObject { ["job-id"] = jobId, ["options"] = options }, cancellationToken).ConfigureAwait(false);
        await events.WaitForAsync("JOB_STATUS_CHANGE", TimeSpan.FromMinutes(10),
            e => e.GetString("id") == jobId && e.GetString("status") == "concluded", cancellationToken).ConfigureAwait(false);
        var jobs = await qmp.ExecuteAsync("query-jobs", null, cancellationToken).ConfigureAwait(false);
        var job = jobs?.AsArray().OfType<JsonObject>().FirstOrDefault(j => j["id"]?.GetValue<string>() == jobId);
        await qmp.ExecuteAsync("job-dismiss", new JsonObject { ["id"] = jobId }, cancellationToken).ConfigureAwait(false);
        if (job?["error"]?.GetValue<string>() is { } error)
        {
            throw new CtlException($"creating {options["filename"] ?? options["file"]?["filename"]} failed: {error}");
        }
    }
}
