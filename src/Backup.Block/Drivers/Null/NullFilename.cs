using System.Text;
using System.Text.Json.Nodes;

namespace Backup.Block.Drivers.Null;

/// <summary>
/// The file name QEMU gives a null node (null_refresh_filename): <c>null-co://</c> (or <c>null-aio://</c>)
/// when no option but <c>driver</c> and <c>latency-ns</c> was given, else a <c>json:{…}</c> name of the
/// node's options that change what it reads (<c>read-zeroes</c>, <c>driver</c>, <c>size</c>; never
/// <c>latency-ns</c>), as QSD prints it.
/// </summary>
internal static class NullFilename
{
    public static string For(string driver, BlockOptions options)
    {
        var size = options.GetInt64("size");
        var readZeroes = options.GetBool("read-zeroes");
        if (size is null && readZeroes is null)
        {
            return driver + "://";
        }
        // QEMU prints the options in its QDict's hash order; for these keys QSD 7.2 prints
        // read-zeroes, driver, size (checked live).
        var sb = new StringBuilder("json:{");
        var first = true;
        if (readZeroes is { } rz)
        {
            Append(sb, ref first, "read-zeroes", rz ? "true" : "false");
        }
        Append(sb, ref first, "driver", JsonValue.Create(driver).ToJsonString());
        if (size is { } s)
        {
            Append(sb, ref first, "size", s.ToString(System.Globalization.CultureInfo.InvariantCulture));
        }
        return sb.Append('}').ToString();
    }

    private static void Append(StringBuilder sb, ref bool first, string key, string value)
    {
        if (!first)
        {
            sb.Append(", ");
        }
        first = false;
        sb.Append('"').Append(key).Append("\": ").Append(value);
    }
}
