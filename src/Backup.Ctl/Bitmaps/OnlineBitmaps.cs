using System.Text.Json.Nodes;
using Backup.Ctl.Backups;
using Backup.Qmp.Client;

namespace Backup.Ctl.Bitmaps;

/// <summary>Bitmaps of a running daemon, through QMP.</summary>
public static class OnlineBitmaps
{
    public static async Task<List<BitmapView>> ListAsync(QmpClient qmp, string? drive, CancellationToken cancellationToken)
    {
        var nodes = await qmp.ExecuteAsync("query-named-block-nodes", new JsonObject { ["flat"] = true }, cancellationToken).ConfigureAwait(false);
        var views = new List<BitmapView>();
        var found = false;
        foreach (var node in nodes?.AsArray().OfType<JsonObject>() ?? [])
        {
            var name = node["node-name"]!.GetValue<string>();
            if (drive is not null && name != drive)
            {
                continue;
            }
            found = true;
            views.AddRange(DaemonQueries.Bitmaps(node).Select(b => BitmapView.FromQmp(name, b)));
        }
        if (drive is not null && !found)
        {
            throw new CtlException($"no drive '{drive}' in the daemon");
        }
        return views;
    }

    /// <summary>The bitmap's state plus its SHA-256 (x-debug-block-dirty-bitmap-sha256, as iotests compare bitmaps).</summary>
    public static async Task<BitmapView> InspectAsync(QmpClient qmp, string drive, string name, CancellationToken cancellationToken)
    {
        var node = await DaemonQueries.NodeAsync(qmp, drive, cancellationToken).ConfigureAwait(false);
        var b = DaemonQueries.Bitmap(node, name) ?? throw new CtlException($"Dirty bitmap '{name}' not found on '{drive}'");
        var view = BitmapView.FromQmp(drive, b);
        if (view.Inconsistent)
        {
            return view;
        }
        var sha = await qmp.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new JsonObject { ["node"] = drive, ["name"] = name }, cancellationToken)
            .ConfigureAwait(false);
        return view with { Sha256 = sha?["sha256"]?.GetValue<string>() };
    }

    public static Task RemoveAsync(QmpClient qmp, string drive, string name, CancellationToken cancellationToken) =>
        qmp.ExecuteAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = drive, ["name"] = name }, cancellationToken);
}
