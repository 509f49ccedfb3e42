using System.Formats.Asn1;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;

namespace Backup.Block.Security;

/// <summary>
/// ca-crl.pem: the certificates our CAs have revoked. .NET's chain builder reads CRLs only from the
/// system's stores and caches, so the file is parsed here (RFC 5280 §5.1) and each CRL's signature is
/// checked against the CA that issued it; a CRL no CA of ours signed is refused at load, rather than
/// silently trusted or ignored.
/// </summary>
public sealed class CertificateRevocationList
{
    private readonly HashSet<(string Issuer, string Serial)> _revoked;

    private CertificateRevocationList(HashSet<(string, string)> revoked) => _revoked = revoked;

    /// <summary>Revoked (issuer, serial) pairs; for tests and logs.</summary>
    public int Count => _revoked.Count;

    public bool IsRevoked(X509Certificate2 certificate)
    {
        ArgumentNullException.ThrowIfNull(certificate);
        return _revoked.Contains((Convert.ToHexString(certificate.IssuerName.RawData), NormalizeSerial(certificate.SerialNumberBytes.Span, bigEndian: true)));
    }

    /// <summary>Loads every CRL in a PEM file; QEMU's "Cannot load CRL" text when one cannot be used.</summary>
    public static CertificateRevocationList Load(string path, X509Certificate2Collection authorities)
    {
        ArgumentNullException.ThrowIfNull(authorities);
        var fail = (string why) => new BlockException($"Cannot load CRL '{path}': {why}");
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw fail("Error while reading file.");
        }
        var revoked = new HashSet<(string, string)>();
        var rest = text.AsSpan();
        var found = 0;
        while (PemEncoding.TryFind(rest, out var fields))
        {
            if (rest[fields.Label].SequenceEqual("X509 CRL"))
            {
                var der = Convert.FromBase64String(rest[fields.Base64Data].ToString());
                try
                {
                    Parse(der, authorities, revoked, fail);
                }
                catch (Exception e) when (e is AsnContentException or CryptographicException)
                {
                    throw fail("ASN1 parser: Error in DER parsing.");
                }
                found++;
            }
            rest = rest[fields.Location.End..];
        }
        return found > 0 ? new CertificateRevocationList(revoked) : throw fail("Base64 decoding error.");
    }

    private static void Parse(byte[] der, X509Certificate2Collection authorities, HashSet<(string, string)> revoked, Func<string, BlockException> fail)
    {
        // CertificateList ::= SEQUENCE { tbsCertList, signatureAlgorithm, signatureValue BIT STRING }
        var outer = new AsnReader(der, AsnEncodingRules.DER).ReadSequence();
        var tbsBytes = outer.ReadEncodedValue();
        var algorithm = outer.ReadSequence().ReadObjectIdentifier();
        var signature = outer.ReadBitString(out _);

        var tbs = new AsnReader(tbsBytes, AsnEncodingRules.DER).ReadSequence();
        if (tbs.PeekTag().HasSameClassAndValue(Asn1Tag.Integer))
        {
            tbs.ReadInteger();
        }
        tbs.ReadSequence();
        var issuer = tbs.ReadEncodedValue().ToArray();
        ReadTime(tbs);
        if (tbs.HasData && (tbs.PeekTag().HasSameClassAndValue(Asn1Tag.UtcTime) || tbs.PeekTag().HasSameClassAndValue(Asn1Tag.GeneralizedTime)))
        {
            ReadTime(tbs);
        }
        var serials = new List<string>();
        if (tbs.HasData && tbs.PeekTag().HasSameClassAndValue(Asn1Tag.Sequence))
        {
            var entries = tbs.ReadSequence();
            while (entries.HasData)
            {
                var entry = entries.ReadSequence();
                serials.Add(NormalizeSerial(entry.ReadIntegerBytes().Span, bigEndian: true));
            }
        }

        var signer = authorities.FirstOrDefault(a => a.SubjectName.RawData.AsSpan().SequenceEqual(issuer) && VerifySignature(a, algorithm, tbsBytes.Span, signature))
            ?? throw fail("The CRL is not signed by a certificate of ca-cert.pem");
        var issuerKey = Convert.ToHexString(signer.SubjectName.RawData);
        foreach (var s in serials)
        {
            revoked.Add((issuerKey, s));
        }
    }

    private static void ReadTime(AsnReader reader)
    {
        if (reader.PeekTag().HasSameClassAndValue(Asn1Tag.UtcTime))
        {
            reader.ReadUtcTime();
        }
        else
        {
            reader.ReadGeneralizedTime();
        }
    }

    private static bool VerifySignature(X509Certificate2 issuer, string algorithm, ReadOnlySpan<byte> data, byte[] signature)
    {
        var (hash, ecdsa) = algorithm switch
        {
            "1.2.840.113549.1.1.5" => (HashAlgorithmName.SHA1, false),
            "1.2.840.113549.1.1.11" => (HashAlgorithmName.SHA256, false),
            "1.2.840.113549.1.1.12" => (HashAlgorithmName.SHA384, false),
            "1.2.840.113549.1.1.13" => (HashAlgorithmName.SHA512, false),
            "1.2.840.10045.4.3.2" => (HashAlgorithmName.SHA256, true),
            "1.2.840.10045.4.3.3" => (HashAlgorithmName.SHA384, true),
            "1.2.840.10045.4.3.4" => (HashAlgorithmName.SHA512, true),
            _ => (default(HashAlgorithmName), false),
        };
        if (hash.Name is null)
        {
            return false;
        }
        if (ecdsa)
        {
            using var key = issuer.GetECDsaPublicKey();
            return key is not null && key.VerifyData(data, signature, hash, DSASignatureFormat.Rfc3279DerSequence);
        }
        using var rsa = issuer.GetRSAPublicKey();
        return rsa is not null && rsa.VerifyData(data, signature, hash, RSASignaturePadding.Pkcs1);
    }

    /// <summary>A serial number as upper-case hex without leading zero bytes, whatever order it came in.</summary>
    private static string NormalizeSerial(ReadOnlySpan<byte> serial, bool bigEndian)
    {
        var bytes = serial.ToArray();
        if (!bigEndian)
        {
            Array.Reverse(bytes);
        }
        var start = 0;
        while (start < bytes.Length - 1 && bytes[start] == 0)
        {
            start++;
        }
        return Convert.ToHexString(bytes, start, bytes.Length - start);
    }
}
