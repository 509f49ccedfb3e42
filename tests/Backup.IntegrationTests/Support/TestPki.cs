namespace Backup.IntegrationTests.Support;

/// <summary>
/// A throw-away X.509 PKI made with certtool at test time, as QEMU's own TLS tests make theirs: a CA, a
/// server certificate for localhost/127.0.0.1/::1, and two client certificates, each in a folder laid out
/// as QEMU's tls-creds-x509 <c>dir</c> (and libnbd's tls-certificates) expects.
/// </summary>
public sealed class TestPki : IDisposable
{
    private TestPki(string root) => Root = root;

    public string Root { get; }

    /// <summary>ca-cert.pem, server-cert.pem, server-key.pem.</summary>
    public string ServerDir => Path.Combine(Root, "server");

    /// <summary>ca-cert.pem, client-cert.pem, client-key.pem for <see cref="ClientDn"/>.</summary>
    public string ClientDir => Path.Combine(Root, "client");

    /// <summary>Another client of the same CA, for <see cref="OtherClientDn"/>.</summary>
    public string OtherClientDir => Path.Combine(Root, "other");

    /// <summary>The client's name as QEMU shows it to authz objects (attributes in certificate order).</summary>
    public const string ClientDn = "C=GB,ST=London,L=London,O=Test Org,CN=client.example.com";

    public const string OtherClientDn = "C=GB,ST=London,L=London,O=Test Org,CN=other.example.com";

    public static async Task<TestPki> CreateAsync()
    {
        var pki = new TestPki(DaemonProcess.NewDirectory());
        var root = pki.Root;
        async Task Certtool(params string[] args) => await Tool.RunAsync("certtool", args);
        async Task Key(string path) => await File.WriteAllTextAsync(path, await Tool.RunAsync("certtool", "--generate-privkey", "--key-type=rsa", "--bits=2048"));
        string Template(string name, string text)
        {
            var path = Path.Combine(root, name + ".info");
            File.WriteAllText(path, text);
            return path;
        }

        var caKey = Path.Combine(root, "ca-key.pem");
        var caCert = Path.Combine(root, "ca-cert.pem");
        await Key(caKey);
        await Certtool("--generate-self-signed", "--load-privkey", caKey, "--template",
            Template("ca", "cn = Test CA\nca\ncert_signing_key\nexpiration_days = 2\n"), "--outfile", caCert);

        async Task Issue(string dir, string prefix, string template)
        {
            Directory.CreateDirectory(dir);
            File.Copy(caCert, Path.Combine(dir, "ca-cert.pem"));
            var key = Path.Combine(dir, prefix + "-key.pem");
            await Key(key);
            await Certtool("--generate-certificate", "--load-ca-certificate", caCert, "--load-ca-privkey", caKey,
                "--load-privkey", key, "--template", template, "--outfile", Path.Combine(dir, prefix + "-cert.pem"));
        }

        await Issue(pki.ServerDir, "server", Template("server",
            "organization = Test Org\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\nip_address = ::1\n" +
            "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n"));
        foreach (var (dir, cn) in new[] { (pki.ClientDir, "client"), (pki.OtherClientDir, "other") })
        {
            await Issue(dir, "client", Template(cn,
                $"country = GB\nstate = London\nlocality = London\norganization = Test Org\ncn = {cn}.example.com\n" +
                "tls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n"));
        }
        return pki;
    }

    public void Dispose() => Directory.Delete(Root, recursive: true);
}
