using System.Text;
using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Qmp.Commands;

/// <summary>A created object; only secrets exist so far.</summary>
public sealed record SecretObject(string Id, byte[] Value);

/// <summary>The objects the daemon holds, by id (QEMU's /objects container).</summary>
public sealed class ObjectRegistry
{
    private readonly Lock _lock = new();
    private readonly Dictionary<string, object> _objects = new(StringComparer.Ordinal);

    public bool TryAdd(string id, object value)
    {
        lock (_lock)
        {
            return _objects.TryAdd(id, value);
        }
    }

    public bool Remove(string id)
    {
        lock (_lock)
        {
            return _objects.Remove(id);
        }
    }

    public T? Find<T>(string id) where T : class
    {
        lock (_lock)
        {
            return _objects.GetValueOrDefault(id) as T;
        }
    }
}

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
            var secret = CreateSecret(id, args);
            if (!objects.TryAdd(id, secret))
            {
                throw new BlockException($"attempt to add duplicate property '{id}' to object (type 'container')");
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
