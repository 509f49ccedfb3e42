using System.Globalization;

namespace Backup.Block.Drivers.Nbd;

/// <summary>
/// QEMU's nbd file names, both ways: the name a node reports (nbd_refresh_filename) and the forms QEMU
/// accepts where it takes a file name (nbd_parse_filename, nbd_parse_uri): <c>nbd://HOST[:PORT][/EXPORT]</c>,
/// <c>nbd+tcp://…</c>, <c>nbd+unix:///[EXPORT]?socket=PATH</c>, <c>nbd:unix:PATH[:exportname=EXPORT]</c> and
/// <c>nbd:HOST:PORT[:exportname=EXPORT]</c>.
/// </summary>
public static class NbdFilename
{
    public const string DefaultPort = "10809";

    public static string Format(NbdClientAddress address, string? export) => address switch
    {
        NbdClientUnixAddress u => export is null ? $"nbd+unix://?socket={u.Path}" : $"nbd+unix:///{export}?socket={u.Path}",
        NbdClientInetAddress i => export is null ? $"nbd://{i.Host}:{i.Port}" : $"nbd://{i.Host}:{i.Port}/{export}",
        _ => "nbd",
    };

    /// <summary>True when <paramref name="name"/> selects the nbd driver by its prefix (QEMU's protocol probing).</summary>
    public static bool IsNbd(string name) =>
        name.StartsWith("nbd:", StringComparison.Ordinal) || name.StartsWith("nbd+", StringComparison.Ordinal);

    /// <summary>The nbd node options a file name stands for; QEMU's texts when it is malformed.</summary>
    public static BlockOptions Parse(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (name.StartsWith("nbd://", StringComparison.Ordinal) || name.StartsWith("nbd+", StringComparison.Ordinal))
        {
            return ParseUri(name);
        }
        if (!name.StartsWith("nbd:", StringComparison.Ordinal))
        {
            throw new BlockException("No valid URL specified");
        }
        var rest = name[4..];
        string? export = null;
        var at = rest.IndexOf(":exportname=", StringComparison.Ordinal);
        if (at >= 0)
        {
            export = rest[(at + ":exportname=".Length)..];
            rest = rest[..at];
        }
        BlockOptions server;
        if (rest.StartsWith("unix:", StringComparison.Ordinal))
        {
            server = new BlockOptions { ["type"] = "unix", ["path"] = rest[5..] };
        }
        else
        {
            var colon = rest.LastIndexOf(':');
            if (colon <= 0)
            {
                throw new BlockException("No valid URL specified");
            }
            server = new BlockOptions { ["type"] = "inet", ["host"] = rest[..colon], ["port"] = rest[(colon + 1)..] };
        }
        return Options(server, export);
    }

    private static BlockOptions ParseUri(string name)
    {
        if (!Uri.TryCreate(name, UriKind.Absolute, out var uri))
        {
            throw new BlockException("No valid URL specified");
        }
        var path = Uri.UnescapeDataString(uri.AbsolutePath);
        var export = path.Length > 1 ? path[1..] : null;
        string? socket = null;
        foreach (var part in uri.Query.TrimStart('?').Split('&', StringSplitOptions.RemoveEmptyEntries))
        {
            var eq = part.IndexOf('=', StringComparison.Ordinal);
            if (eq > 0 && part[..eq] == "socket")
            {
                socket = Uri.UnescapeDataString(part[(eq + 1)..]);
            }
            else
            {
                throw new BlockException("No valid URL specified");
            }
        }
        switch (uri.Scheme)
        {
            case "nbd" or "nbd+tcp":
                if (socket is not null || string.IsNullOrEmpty(uri.Host))
                {
                    throw new BlockException("No valid URL specified");
                }
                return Options(new BlockOptions
                {
                    ["type"] = "inet",
                    ["host"] = uri.Host.Trim('[', ']'),
                    ["port"] = uri.IsDefaultPort || uri.Port < 0 ? DefaultPort : uri.Port.ToString(CultureInfo.InvariantCulture),
                }, export);
            case "nbd+unix":
                if (socket is null || !string.IsNullOrEmpty(uri.Host))
                {
                    throw new BlockException("No valid URL specified");
                }
                return Options(new BlockOptions { ["type"] = "unix", ["path"] = socket }, export);
            default:
                throw new BlockException("No valid URL specified");
        }
    }

    private static BlockOptions Options(BlockOptions server, string? export)
    {
        var options = new BlockOptions { ["driver"] = "nbd", ["server"] = server };
        if (export is not null)
        {
            options["export"] = export;
        }
        return options;
    }
}
