using System.Text.Json;
using System.Text.Json.Nodes;
using Backup.Qmp.Client;

namespace Backup.Ctl;

/// <summary>
/// Finds the daemon's QMP socket the way an operator would: <c>--qmp unix:PATH</c> or <c>--qmp tcp:HOST:PORT</c>
/// (backupd's own spelling); else the first monitor of backupd's <c>--config FILE</c> (its <c>qmp</c> key, or a
/// listening <c>chardev</c> socket); else the demo daemon's socket, <c>$BACKUPD_STATE_DIR/qmp.sock</c> or
/// <c>./state/qmp.sock</c> (src/Backup.Daemon/Hosting/BackupDaemon.cs).
/// </summary>
public static class DaemonConnection
{
    public static QmpAddress Resolve(string? qmp, string? configFile, IReadOnlyDictionary<string, string?> environment)
    {
        ArgumentNullException.ThrowIfNull(environment);
        if (qmp is not null)
        {
            try
            {
                return QmpAddress.Parse(qmp);
            }
            catch (FormatException)
            {
                throw new CtlException($"--qmp {qmp}: expected 'unix:PATH' or 'tcp:HOST:PORT'", ExitCodes.Usage);
            }
        }
        if (configFile is not null)
        {
            return FromConfig(configFile);
        }
        var state = environment.TryGetValue("BACKUPD_STATE_DIR", out var d) && !string.IsNullOrEmpty(d) ? d : "state";
        return new QmpAddress.Unix(Path.GetFullPath(Path.Combine(state, "qmp.sock")));
    }

    /// <summary>backupd's config file: a JSON object whose keys are its long options without dashes.</summary>
    private static QmpAddress FromConfig(string path)
    {
        JsonObject config;
        try
        {
            config = JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                ?? throw new CtlException($"--config {path}: the file must hold a JSON object", ExitCodes.Usage);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or JsonException)
        {
            throw new CtlException($"--config {path}: {e.Message}", ExitCodes.Usage);
        }
        foreach (var text in Strings(config["qmp"]))
        {
            try
            {
                return QmpAddress.Parse(text);
            }
            catch (FormatException)
            {
                throw new CtlException($"--config {path}: qmp '{text}': expected 'unix:PATH' or 'tcp:HOST:PORT'", ExitCodes.Usage);
            }
        }
        foreach (var text in Strings(config["chardev"]))
        {
            if (ChardevAddress(text) is { } address)
            {
                return address;
            }
        }
        throw new CtlException($"--config {path}: no QMP socket in it (no 'qmp' key, no listening 'chardev' socket)", ExitCodes.Usage);
    }

    private static IEnumerable<string> Strings(JsonNode? node) => node switch
    {
        JsonValue v when v.TryGetValue<string>(out var s) => [s],
        JsonArray a => a.OfType<JsonValue>().Select(v => v.TryGetValue<string>(out var s) ? s : null).OfType<string>(),
        _ => [],
    };

    /// <summary><c>socket,id=m,path=/run/b.sock,server=on,wait=off</c> or <c>socket,id=m,host=H,port=P,server=on</c>.</summary>
    private static QmpAddress? ChardevAddress(string text)
    {
        var parts = text.Split(',');
        if (parts.Length == 0 || parts[0] != "socket")
        {
            return null;
        }
        var keys = parts.Skip(1).Select(p => p.Split('=', 2)).ToDictionary(kv => kv[0], kv => kv.Length > 1 ? kv[1] : "on", StringComparer.Ordinal);
        if (keys.TryGetValue("path", out var path))
        {
            return new QmpAddress.Unix(path);
        }
        if (keys.TryGetValue("host", out var host) && keys.TryGetValue("port", out var port))
        {
            return QmpAddress.Parse($"tcp:{host}:{port}");
        }
        return null;
    }

    /// <summary>Connects and negotiates; a missing daemon is exit code 3 with a message that says where it looked.</summary>
    public static async Task<QmpClient> ConnectAsync(QmpAddress address, CancellationToken cancellationToken)
    {
        try
        {
            return await QmpClient.ConnectAsync(address, negotiate: true, cancellationToken: cancellationToken).ConfigureAwait(false);
        }
        catch (QmpConnectionException e)
        {
            throw new CtlException($"no backupd at {address}: {e.Message} (start backupd, or say where it listens with --qmp unix:PATH, --qmp tcp:HOST:PORT or --config FILE)",
                ExitCodes.CannotConnect);
        }
    }
}
