using System.Reflection;
using System.Text.Json.Nodes;

namespace Backup.Qmp;

/// <summary>
/// What the greeting and query-version report: the qemu-storage-daemon release whose behaviour we
/// match (clients gate features on it) and, in 'package', backupd and its own version.
/// </summary>
public sealed record VersionInfo(int Major, int Minor, int Micro, string Package)
{

    public static string ProductVersion { get; } =
        typeof(VersionInfo).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion.Split('+')[0]
        ?? "0.0.0";

    /// <summary>qemu-storage-daemon 7.2 is the reference whose replies backupd reproduces.</summary>
    public static VersionInfo Current { get; } = new(7, 2, 0, "backupd " + ProductVersion);

    public JsonObject ToJson() => new()
    {
        ["qemu"] = new JsonObject { ["micro"] = Micro, ["minor"] = Minor, ["major"] = Major },
        ["package"] = Package,
    };
}
