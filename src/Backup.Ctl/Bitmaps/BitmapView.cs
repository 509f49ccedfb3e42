using System.Text.Json.Nodes;

namespace Backup.Ctl.Bitmaps;

/// <summary>One dirty bitmap as backupctl shows it, online (QMP's BlockDirtyInfo) or offline (read from a qcow2 image).</summary>
public sealed record BitmapView(string Node, string Name, long Count, long Granularity, bool Recording, bool Busy, bool Persistent,
    bool Inconsistent, string? Sha256 = null)
{
    public static BitmapView FromQmp(string node, JsonObject b) => new(
        node,
        b["name"]!.GetValue<string>(),
        b["count"]?.GetValue<long>() ?? 0,
        b["granularity"]?.GetValue<long>() ?? 0,
        b["recording"]?.GetValue<bool>() ?? false,
        b["busy"]?.GetValue<bool>() ?? false,
        b["persistent"]?.GetValue<bool>() ?? false,
        b["inconsistent"]?.GetValue<bool>() ?? false);

    public JsonObject ToJson()
    {
        var o = new JsonObject
        {
            ["node"] = Node, ["name"] = Name, ["count"] = Count, ["granularity"] = Granularity,
            ["recording"] = Recording, ["busy"] = Busy, ["persistent"] = Persistent, ["inconsistent"] = Inconsistent,
        };
        if (Sha256 is not null)
        {
            o["sha256"] = Sha256;
        }
        return o;
    }
}
