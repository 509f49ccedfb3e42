using System.Formats.Asn1;
using System.Security.Cryptography.X509Certificates;
using System.Text;

namespace Backup.Block.Security;

/// <summary>
/// A certificate's subject as QEMU shows it to authz objects: gnutls_x509_crt_get_dn's form, the
/// attributes in the order the certificate encodes them, joined by commas without spaces, values
/// escaped as RFC 4514 says (e.g. <c>C=GB,ST=London,L=London,O=Test Org,CN=client.example.com</c>;
/// checked against qemu-storage-daemon 7.2's "TLS x509 authz check for ... is denied").
/// </summary>
public static class DistinguishedName
{
    private static readonly Dictionary<string, string> ShortNames = new(StringComparer.Ordinal)
    {
        ["2.5.4.3"] = "CN",
        ["2.5.4.4"] = "SN",
        ["2.5.4.5"] = "serialNumber",
        ["2.5.4.6"] = "C",
        ["2.5.4.7"] = "L",
        ["2.5.4.8"] = "ST",
        ["2.5.4.9"] = "STREET",
        ["2.5.4.10"] = "O",
        ["2.5.4.11"] = "OU",
        ["2.5.4.12"] = "title",
        ["2.5.4.17"] = "postalCode",
        ["2.5.4.42"] = "GN",
        ["2.5.4.43"] = "initials",
        ["2.5.4.44"] = "generationQualifier",
        ["2.5.4.46"] = "dnQualifier",
        ["2.5.4.65"] = "pseudonym",
        ["0.9.2342.19200300.100.1.1"] = "UID",
        ["0.9.2342.19200300.100.1.25"] = "DC",
        ["1.2.840.113549.1.9.1"] = "EMAIL",
    };

    public static string Format(X500DistinguishedName name)
    {
        ArgumentNullException.ThrowIfNull(name);
        var text = new StringBuilder();
        try
        {
            var rdns = new AsnReader(name.RawData, AsnEncodingRules.DER).ReadSequence();
            while (rdns.HasData)
            {
                var set = rdns.ReadSetOf();
                if (text.Length > 0)
                {
                    text.Append(',');
                }
                var first = true;
                while (set.HasData)
                {
                    var attribute = set.ReadSequence();
                    var oid = attribute.ReadObjectIdentifier();
                    var value = attribute.ReadEncodedValue();
                    if (!first)
                    {
                        text.Append('+');
                    }
                    first = false;
                    if (ShortNames.TryGetValue(oid, out var shortName) && DecodeString(value.Span) is { } s)
                    {
                        text.Append(shortName).Append('=');
                        Escape(text, s);
                    }
                    else
                    {
                        text.Append(oid).Append("=#").Append(Convert.ToHexString(value.Span));
                    }
                }
            }
        }
        catch (AsnContentException)
        {
            return name.Name;
        }
        return text.ToString();
    }

    private static string? DecodeString(ReadOnlySpan<byte> encoded)
    {
        var reader = new AsnReader(encoded.ToArray(), AsnEncodingRules.BER);
        var tag = reader.PeekTag();
        if (tag.TagClass != TagClass.Universal)
        {
            return null;
        }
        return (UniversalTagNumber)tag.TagValue switch
        {
            UniversalTagNumber.UTF8String or UniversalTagNumber.PrintableString or UniversalTagNumber.IA5String
                or UniversalTagNumber.T61String or UniversalTagNumber.BMPString or UniversalTagNumber.UniversalString
                or UniversalTagNumber.VisibleString or UniversalTagNumber.NumericString
                => reader.ReadCharacterString((UniversalTagNumber)tag.TagValue),
            _ => null,
        };
    }

    /// <summary>RFC 4514 §2.4: a backslash before special characters, a leading '#' or space and a trailing space.</summary>
    private static void Escape(StringBuilder text, string value)
    {
        for (var i = 0; i < value.Length; i++)
        {
            var c = value[i];
            var special = c is ',' or '+' or '"' or '\\' or '<' or '>' or ';'
                || (i == 0 && c is '#' or ' ')
                || (i == value.Length - 1 && c == ' ');
            if (special)
            {
                text.Append('\\');
            }
            text.Append(c);
        }
    }
}
