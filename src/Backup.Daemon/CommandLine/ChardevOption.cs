using System.Globalization;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Qmp.Server;

namespace Backup.Daemon.CommandLine;

/// <summary>
/// A QMP character device: a socket chardev (the only backend a daemon's monitor can use here), as
/// QEMU's <c>-chardev socket,...</c> reads it. One of <c>path</c>, <c>host</c>+<c>port</c> or <c>fd</c>;
/// <c>server=on</c> listens (or adopts a listening descriptor), otherwise the daemon connects (or
/// adopts a connected descriptor); <c>wait</c> (server only, on by default as in QEMU) holds start-up
/// until the first client connects.
/// </summary>
/// <param name="Id">The chardev id a --monitor names.</param>
/// <param name="Endpoint">Where QMP is served.</param>
/// <param name="Wait">Hold start-up until a client connects (server mode only).</param>
/// <param name="Text">The option's argument, for messages.</param>
/// <param name="TlsCreds">QEMU's tls-creds: the id of TLS credentials (server ones to listen, client ones to connect); looked up when the monitor opens.</param>
/// <param name="TlsAuthz">QEMU's tls-authz: the id of an authz object that must allow each client certificate's name.</param>
public sealed record ChardevSpec(string Id, QmpEndpoint Endpoint, bool Wait, string Text, string? TlsCreds = null, string? TlsAuthz = null)
{
    /// <summary>QEMU's socket chardev keys this daemon honours or checks; the others are refused by name.</summary>
    private static readonly HashSet<string> Known = new(StringComparer.Ordinal)
    {
        "backend", "id", "path", "host", "port", "fd", "server", "wait", "nodelay", "ipv4", "ipv6",
        "abstract", "tight", "reconnect", "to", "tls-creds", "tls-authz",
    };

    /// <summary>Keys QEMU knows for socket chardevs that need features this daemon does not have.</summary>
    private static readonly HashSet<string> Unsupported = new(StringComparer.Ordinal)
    {
        "telnet", "tn3270", "websocket", "logfile", "logappend", "mux", "signal",
    };

    /// <summary>Boolean keys that QEMU's chardev options still take in the short form (<c>server,nowait</c>).</summary>
    private static readonly string[] ShortFormBooleans = ["server", "wait", "nodelay", "ipv4", "ipv6", "abstract", "tight"];

    /// <param name="text">The option's argument.</param>
    /// <param name="warnings">Receives QEMU's deprecation warnings (short-form booleans), to print before start-up.</param>
    public static ChardevSpec Parse(string text, ICollection<string> warnings)
    {
        ArgumentNullException.ThrowIfNull(text);
        ArgumentNullException.ThrowIfNull(warnings);
        var fail = (string m) => new CommandLineException($"--chardev {text}: {m}");
        JsonObject o;
        try
        {
            o = KeyValueSyntax.Parse(ExpandShortFormBooleans(text, m => warnings.Add($"--chardev {text}: {m}")), "backend");
        }
        catch (BlockException e)
        {
            throw fail(e.Message);
        }
        string? Get(string k) => o[k]?.GetValue<string>();
        foreach (var (key, _) in o)
        {
            if (Unsupported.Contains(key))
            {
                throw fail($"'{key}' is not supported by backupd");
            }
            if (!Known.Contains(key))
            {
                throw fail($"Invalid parameter '{key}'");
            }
        }
        var backend = Get("backend");
        if (backend != "socket")
        {
            throw fail($"chardev backend '{backend}' is not supported: backupd serves QMP on 'socket' chardevs only");
        }
        var id = Get("id") ?? throw fail("chardev: no id specified");
        var server = Flag(o, "server", fail) ?? false;
        var wait = Flag(o, "wait", fail);
        _ = Flag(o, "nodelay", fail);
        var path = Get("path");
        var host = Get("host");
        var fdText = Get("fd");
        if ((path is not null ? 1 : 0) + (host is not null ? 1 : 0) + (fdText is not null ? 1 : 0) > 1)
        {
            throw fail("None or one of 'path', 'fd' or 'host' option required.");
        }
        if (!server && wait is not null)
        {
            throw fail("'wait' option is incompatible with socket in client connect mode");
        }
        if (server && o["reconnect"] is not null)
        {
            throw fail("'reconnect' option is incompatible with socket in server listen mode");
        }
        // QEMU's checks of the TLS keys (chardev/char-socket.c): TLS over TCP or a passed socket only.
        var tlsCreds = Get("tls-creds");
        var tlsAuthz = Get("tls-authz");
        if (tlsCreds is not null && path is not null)
        {
            throw fail("'tls_creds' option is incompatible with 'unix' address type");
        }
        if (tlsAuthz is not null && tlsCreds is null)
        {
            throw fail("'tls_authz' option requires 'tls_creds' option");
        }
        QmpEndpoint endpoint;
        if (fdText is not null)
        {
            if (!int.TryParse(fdText, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var fd))
            {
                throw fail($"Unable to parse FD number {fdText}");
            }
            endpoint = server ? new QmpEndpoint.InheritedListener(fd) : new QmpEndpoint.InheritedConnection(fd);
        }
        else if (path is not null)
        {
            endpoint = server ? new QmpEndpoint.Unix(path) : new QmpEndpoint.UnixConnect(path);
        }
        else if (Get("port") is { } port)
        {
            // A listener needs an explicit host (0.0.0.0 for every address): QSD opens no listener at all
            // without one, and listening everywhere by default would expose the monitor.
            if (server && host is null)
            {
                throw fail("chardev: socket: no host given");
            }
            var p = ParsePort(host ?? "localhost", port, fail);
            endpoint = server ? new QmpEndpoint.Tcp(host!, p) : new QmpEndpoint.TcpConnect(host ?? "localhost", p);
        }
        else if (host is not null)
        {
            throw fail("chardev: socket: no port given");
        }
        else
        {
            throw fail("chardev: socket: no host given");
        }
        return new ChardevSpec(id, endpoint, server && (wait ?? true), text, tlsCreds, tlsAuthz);
    }

    /// <summary>
    /// <c>server</c> → <c>server=on</c>, <c>nowait</c> → <c>wait=off</c>, with QEMU's warning. Only after the
    /// first element, which is the backend.
    /// </summary>
    private static string ExpandShortFormBooleans(string text, Action<string> warn)
    {
        var parts = SplitElements(text);
        for (var i = 1; i < parts.Count; i++)
        {
            var part = parts[i];
            if (part.Contains('=', StringComparison.Ordinal))
            {
                continue;
            }
            foreach (var key in ShortFormBooleans)
            {
                if (part == key || part == "no" + key)
                {
                    warn($"warning: short-form boolean option '{part}' deprecated\nPlease use {key}={(part == key ? "on" : "off")} instead");
                    parts[i] = key + (part == key ? "=on" : "=off");
                    break;
                }
            }
        }
        return string.Join(',', parts);
    }

    /// <summary>Splits at single commas, keeping <c>,,</c> (an escaped comma) inside its element.</summary>
    private static List<string> SplitElements(string text)
    {
        var parts = new List<string>();
        var start = 0;
        for (var i = 0; i < text.Length; i++)
        {
            if (text[i] != ',')
            {
                continue;
            }
            if (i + 1 < text.Length && text[i + 1] == ',')
            {
                i++;
                continue;
            }
            parts.Add(text[start..i]);
            start = i + 1;
        }
        parts.Add(text[start..]);
        return parts;
    }

    /// <summary>QEMU's boolean option values; a bare key was already refused by the key=value syntax.</summary>
    private static bool? Flag(JsonObject o, string key, Func<string, CommandLineException> fail) => o[key]?.GetValue<string>() switch
    {
        null => null,
        "on" or "yes" or "true" or "y" => true,
        "off" or "no" or "false" or "n" => false,
        _ => throw fail($"Parameter '{key}' expects 'on' or 'off'"),
    };

    private static int ParsePort(string host, string port, Func<string, CommandLineException> fail) =>
        int.TryParse(port, NumberStyles.None, CultureInfo.InvariantCulture, out var p) && p <= 65535
            ? p
            : throw fail($"address resolution failed for {host}:{port}: Servname not supported for ai_socktype");
}
