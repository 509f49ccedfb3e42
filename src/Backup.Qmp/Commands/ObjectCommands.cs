using System.Text;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Objects;
using Backup.Block.Security;

namespace Backup.Qmp.Commands;

/// <summary>object-add and object-del.</summary>
public sealed class ObjectCommands(ObjectRegistry objects) : ICommandModule
{
    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("object-add", (args, _, _) =>
        {
            var id = args["id"]!.GetValue<string>();
            BlockGraph.ValidateObjectId(id);
            // QEMU adds the object under /objects before it completes (loads) it: a taken id is the first error.
            if (objects.Find(id) is not null)
            {
                throw Duplicate(id);
            }
            object created = args["qom-type"]!.GetValue<string>() switch
            {
                "secret" => CreateSecret(id, args),
                "tls-creds-x509" => CreateX509(id, args),
                "tls-creds-psk" => CreatePsk(id, args),
                "authz-simple" => new AuthzSimple(id, args["identity"]!.GetValue<string>()),
                "authz-list" => new AuthzList(id, Policy(args["policy"]) ?? AuthzPolicy.Deny, Rules(args["rules"])),
                "authz-listfile" => AuthzListFile.Load(id, args["filename"]!.GetValue<string>(), args["refresh"]?.GetValue<bool>() ?? true),
                var type => throw new BlockException($"invalid object type: {type}"),
            };
            if (!objects.TryAdd(id, created))
            {
                (created as IDisposable)?.Dispose();
                throw Duplicate(id);
            }
            return ValueTask.FromResult<JsonNode?>(null);
        });
        table.Add("object-del", (args, _, _) =>
        {
            var id = args["id"]!.GetValue<string>();
            if (!objects.Remove(id))
            {
                throw new BlockException($"object '{id}' not found");
            }
            return ValueTask.FromResult<JsonNode?>(null);
        });
    }

    private static BlockException Duplicate(string id) => new($"attempt to add duplicate property '{id}' to object (type 'container')");

    private static TlsCredentialsPsk CreatePsk(string id, JsonObject args)
    {
        CheckPriority(args);
        return TlsCredentialsPsk.Create(id, args["dir"]?.GetValue<string>(), Endpoint(args), args["username"]?.GetValue<string>());
    }

    private TlsCredentialsX509 CreateX509(string id, JsonObject args)
    {
        CheckPriority(args);
        return TlsCredentialsX509.Load(new TlsX509Options(id, args["dir"]?.GetValue<string>(), Endpoint(args),
            args["verify-peer"]?.GetValue<bool>() ?? true, args["sanity-check"]?.GetValue<bool>() ?? true,
            args["passwordid"]?.GetValue<string>()), objects);
    }

    private static TlsEndpoint Endpoint(JsonObject args) =>
        args["endpoint"]?.GetValue<string>() == "server" ? TlsEndpoint.Server : TlsEndpoint.Client;

    private static AuthzPolicy? Policy(JsonNode? node) => node?.GetValue<string>() switch
    {
        null => null,
        "allow" => AuthzPolicy.Allow,
        _ => AuthzPolicy.Deny,
    };

    private static List<AuthzRule> Rules(JsonNode? node) => node?.AsArray().Select(r => new AuthzRule(
        r!["match"]!.GetValue<string>(),
        Policy(r["policy"]) ?? AuthzPolicy.Deny,
        r["format"]?.GetValue<string>() == "glob" ? AuthzMatchFormat.Glob : AuthzMatchFormat.Exact)).ToList() ?? [];

    /// <summary>
    /// QEMU's priority is a GnuTLS priority string; backupd's TLS is OpenSSL's through .NET, which cannot
    /// honour one. The system's defaults are what QEMU's "@SYSTEM"/"NORMAL" mean, so those are accepted;
    /// anything else is refused rather than silently ignored.
    /// </summary>
    private static void CheckPriority(JsonObject args)
    {
        var priority = args["priority"]?.GetValue<string>();
        if (priority is null or "NORMAL" or "@SYSTEM" or "SYSTEM")
        {
            return;
        }
        throw new BlockException($"TLS priority '{priority}' is not supported by backupd: only NORMAL or @SYSTEM (the system's TLS policy)");
    }

    private static SecretObject CreateSecret(string id, JsonObject args)
    {
        var data = args["data"]?.GetValue<string>();
        var file = args["file"]?.GetValue<string>();
        if (args.ContainsKey("keyid") || args.ContainsKey("iv"))
        {
            throw new BlockException("Encrypted secrets ('keyid', 'iv') are not supported");
        }
        if ((data is null) == (file is null))
        {
            throw new BlockException(data is null ? "'file' or 'data' property must be set" : "'data' and 'file' are mutually exclusive");
        }
        byte[] raw;
        try
        {
            raw = data is not null ? Encoding.UTF8.GetBytes(data) : File.ReadAllBytes(file!);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Unable to read {file}: {e.Message}");
        }
        if (args["format"]?.GetValue<string>() == "base64")
        {
            try
            {
                raw = Convert.FromBase64String(Encoding.ASCII.GetString(raw));
            }
            catch (FormatException)
            {
                throw new BlockException("Malformed base64 data");
            }
        }
        return new SecretObject(id, raw);
    }
}
