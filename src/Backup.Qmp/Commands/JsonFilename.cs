using System.Text.Json;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Qmp.Schema;

namespace Backup.Qmp.Commands;

/// <summary>
/// QEMU's <c>json:</c> pseudo-protocol: where a command takes a file name, <c>json:{…}</c> gives a whole
/// node's options instead (e.g. a qcow2 image on an NBD export). The object is checked against
/// BlockdevOptions like blockdev-add's arguments, so its errors name the member as QEMU's do.
/// </summary>
public static class JsonFilename
{
    private const string Prefix = "json:";

    public static bool IsJson(string filename) => filename.StartsWith(Prefix, StringComparison.Ordinal);

    /// <summary>
    /// The node options <paramref name="filename"/> stands for; QEMU's errors when it does not parse. An
    /// explicit <paramref name="format"/> wins over the object's own driver, as QEMU joins the options.
    /// </summary>
    public static BlockOptions Parse(string filename, string? format = null)
    {
        ArgumentNullException.ThrowIfNull(filename);
        JsonNode? node;
        try
        {
            node = JsonNode.Parse(filename.AsSpan(Prefix.Length).ToString(), documentOptions: new JsonDocumentOptions { MaxDepth = 64 });
        }
        catch (JsonException e)
        {
            // QEMU's parser reports input that ends too soon as "premature EOI"; other faults by kind.
            var premature = e.BytePositionInLine >= filename.Length - Prefix.Length || e.Message.Contains("end of data", StringComparison.OrdinalIgnoreCase);
            throw new BlockException($"Could not parse the JSON options: JSON parse error{(premature ? ", premature EOI" : "")}");
        }
        if (node is not JsonObject obj)
        {
            throw new BlockException("Invalid JSON object given");
        }
        if (format is not null)
        {
            obj["driver"] = format;
        }
        var validated = (JsonObject)InputValidator.Validate(obj, SchemaLoader.Default.Types["BlockdevOptions"], null, InputForm.Json)!;
        return BlockOptionsBinder.Bind(validated);
    }
}
