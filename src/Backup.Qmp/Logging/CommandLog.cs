using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Backup.Qmp.Logging;

/// <summary>
/// How a command's arguments appear in the log: compact JSON with secrets taken out and a bounded length.
/// A secret object's <c>data</c> (object-add, --object secret) and anything named like a password or a
/// passphrase never reach the log, at any level.
/// </summary>
public static class CommandLog
{
    public const string Redacted = "<redacted>";

    /// <summary>Longer argument texts are cut here: a log line, not a dump.</summary>
    public const int MaxLength = 1024;

    /// <summary>A log line is not HTML: paths and markers stay readable ("&lt;" is not "\u003C").</summary>
    private static readonly JsonSerializerOptions LogJson = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static string Arguments(string command, JsonObject? arguments)
    {
        if (arguments is null || arguments.Count == 0)
        {
            return "{}";
        }
        var copy = (JsonObject)arguments.DeepClone();
        Redact(copy, isObjectAdd: command == "object-add");
        var text = copy.ToJsonString(LogJson);
        return text.Length <= MaxLength ? text : string.Concat(text.AsSpan(0, MaxLength), "…");
    }

    private static void Redact(JsonNode? node, bool isObjectAdd)
    {
        switch (node)
        {
            case JsonObject o:
                foreach (var key in o.Select(p => p.Key).ToList())
                {
                    if (IsSecretKey(key, isObjectAdd))
                    {
                        o[key] = Redacted;
                    }
                    else
                    {
                        Redact(o[key], isObjectAdd: false);
                    }
                }
                break;
            case JsonArray a:
                foreach (var item in a)
                {
                    Redact(item, isObjectAdd: false);
                }
                break;
        }
    }

    private static bool IsSecretKey(string key, bool isObjectAdd) =>
        (isObjectAdd && key is "data" or "iv")
        // "password-secret" names a secret object by id: that is not the secret.
        || (key.Contains("password", StringComparison.OrdinalIgnoreCase) && !key.EndsWith("-secret", StringComparison.Ordinal))
        || key.Contains("passphrase", StringComparison.OrdinalIgnoreCase);
}
