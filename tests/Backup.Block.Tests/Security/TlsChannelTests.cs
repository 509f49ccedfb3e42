using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Backup.Block.Objects;
using Backup.Block.Security;

namespace Backup.Block.Tests.Security;

/// <summary>
/// Both ends of <see cref="TlsChannel"/> against each other over loopback TCP, with credentials loaded
/// from QEMU's file layout by <see cref="TlsCredentialsX509"/> (a PKI made here with .NET).
/// </summary>
public sealed class TlsChannelTests : IDisposable
{
    private readonly string _root = Path.Combine(Path.GetTempPath(), "tlsch-" + Guid.NewGuid().ToString("N")[..8]);
    private readonly RSA _caKey = RSA.Create(2048);
    private readonly X509Certificate2 _ca;
    private readonly ObjectRegistry _objects = new();

    public TlsChannelTests()
    {
        Directory.CreateDirectory(_root);
        var request = new CertificateRequest("CN=Unit CA", _caKey, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        request.CertificateExtensions.Add(new X509SubjectKeyIdentifierExtension(request.PublicKey, false));
        _ca = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-10), DateTimeOffset.UtcNow.AddDays(10));
    }

    public void Dispose()
    {
        _ca.Dispose();
        _caKey.Dispose();
        Directory.Delete(_root, recursive: true);
    }

    private static readonly byte[] Serial1 = [0x11];
    private static readonly byte[] Serial2 = [0x22];
    private static readonly byte[] Serial3 = [0x33];

    /// <summary>A folder laid out as tls-creds-x509's dir, with a certificate issued by the test CA.</summary>
    /// <param name="subject">.NET's string form, which encodes the last attribute first: "CN=a,C=GB" is encoded C, then CN.</param>
    private string Issue(string name, string prefix, string subject, bool server, byte[] serial, bool isCA = false, int days = 2)
    {
        var dir = Path.Combine(_root, name);
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "ca-cert.pem"), _ca.ExportCertificatePem());
        using var key = RSA.Create(2048);
        var request = new CertificateRequest(subject, key, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(isCA, false, 0, true));
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension(
            [new Oid(server ? "1.3.6.1.5.5.7.3.1" : "1.3.6.1.5.5.7.3.2")], false));
        if (server)
        {
            var san = new SubjectAlternativeNameBuilder();
            san.AddDnsName("localhost");
            san.AddIpAddress(IPAddress.Loopback);
            request.CertificateExtensions.Add(san.Build());
        }
        using var cert = request.Create(_ca, DateTimeOffset.UtcNow.AddDays(days - 3), DateTimeOffset.UtcNow.AddDays(days), serial);
        File.WriteAllText(Path.Combine(dir, prefix + "-cert.pem"), cert.ExportCertificatePem());
        File.WriteAllText(Path.Combine(dir, prefix + "-key.pem"), key.ExportPkcs8PrivateKeyPem());
        return dir;
    }

    private string Server(byte[]? revoke = null)
    {
        var dir = Issue("server", "server", "O=Unit,CN=localhost", server: true, Serial1);
        if (revoke is not null)
        {
            var crl = new CertificateRevocationListBuilder();
            crl.AddEntry(revoke);
            var der = crl.Build(_ca, 1, DateTimeOffset.UtcNow.AddDays(1), HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
            File.WriteAllText(Path.Combine(dir, "ca-crl.pem"), PemEncoding.WriteString("X509 CRL", der));
        }
        return dir;
    }

    private TlsCredentialsX509 Load(string dir, TlsEndpoint endpoint, bool verifyPeer = true) =>
        TlsCredentialsX509.Load(new TlsX509Options("t-" + Path.GetFileName(dir), dir, endpoint, verifyPeer), _objects);

    /// <summary>Runs both handshakes at once; each side's exception (or null) comes back.</summary>
    private static async Task<(Exception? Server, Exception? Client)> HandshakeAsync(TlsServerPolicy server, TlsCredentials client, string? hostname)
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        using var c = new TcpClient();
        await c.ConnectAsync(IPAddress.Loopback, ((IPEndPoint)listener.LocalEndpoint).Port);
        using var s = await listener.AcceptTcpClientAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));

        async Task<Exception?> Serve()
        {
            try
            {
                await using var ssl = await TlsChannel.AcceptAsync(s.GetStream(), server, timeout.Token);
                var b = new byte[5];
                await ssl.ReadExactlyAsync(b, timeout.Token);
                await ssl.WriteAsync(b, timeout.Token);
                return null;
            }
            catch (Exception e) when (e is TlsException or IOException)
            {
                s.Close();
                return e;
            }
        }

        async Task<Exception?> Connect()
        {
            try
            {
                await using var ssl = await TlsChannel.ConnectAsync(c.GetStream(), client, hostname, timeout.Token);
                await ssl.WriteAsync("hello"u8.ToArray(), timeout.Token);
                var b = new byte[5];
                await ssl.ReadExactlyAsync(b, timeout.Token);
                b.Should().Equal("hello"u8.ToArray());
                return null;
            }
            catch (Exception e) when (e is TlsException or IOException)
            {
                c.Close();
                return e;
            }
        }

        var results = await Task.WhenAll(Serve(), Connect());
        return (results[0], results[1]);
    }

    [Fact]
    public async Task A_verified_client_that_authz_allows_gets_a_session()
    {
        var server = Load(Server(), TlsEndpoint.Server);
        var client = Load(Issue("client", "client", "CN=alice,O=Unit,C=GB", server: false, Serial2), TlsEndpoint.Client);
        _objects.TryAdd("az", new AuthzSimple("az", "C=GB,O=Unit,CN=alice"));
        var (s, c) = await HandshakeAsync(new TlsServerPolicy(server, "az", _objects), client, "localhost");
        s.Should().BeNull();
        c.Should().BeNull();
        (s, c) = await HandshakeAsync(new TlsServerPolicy(server, null, _objects), client, "127.0.0.1");
        s.Should().BeNull();
        c.Should().BeNull();
    }

    [Fact]
    public async Task Authz_refuses_a_name_it_does_not_allow()
    {
        var server = Load(Server(), TlsEndpoint.Server);
        var client = Load(Issue("client", "client", "CN=mallory,O=Unit,C=GB", server: false, Serial2), TlsEndpoint.Client);
        _objects.TryAdd("az", new AuthzSimple("az", "C=GB,O=Unit,CN=alice"));
        var (s, c) = await HandshakeAsync(new TlsServerPolicy(server, "az", _objects), client, "localhost");
        s.Should().BeOfType<TlsException>().Which.Message.Should().Be("TLS x509 authz check for C=GB,O=Unit,CN=mallory is denied");
        c.Should().NotBeNull("the server hangs up");
    }

    [Fact]
    public async Task A_revoked_client_and_a_client_without_a_certificate_are_refused()
    {
        var server = Load(Server(revoke: Serial2), TlsEndpoint.Server);
        server.Revocations!.Count.Should().Be(1);
        var revoked = Load(Issue("client", "client", "CN=alice", server: false, Serial2), TlsEndpoint.Client);
        var (s, _) = await HandshakeAsync(new TlsServerPolicy(server, null, _objects), revoked, "localhost");
        s.Should().BeOfType<TlsException>().Which.Message.Should().Be("Verify failed: The certificate has been revoked");

        var good = Load(Issue("client2", "client", "CN=bob", server: false, Serial3), TlsEndpoint.Client);
        (s, _) = await HandshakeAsync(new TlsServerPolicy(server, null, _objects), good, "localhost");
        s.Should().BeNull();

        var anonymous = Load(Server(), TlsEndpoint.Client);
        anonymous.Certificate.Should().BeNull("a client folder may hold no certificate");
        (s, _) = await HandshakeAsync(new TlsServerPolicy(server, null, _objects), anonymous, "localhost");
        s.Should().BeOfType<TlsException>().Which.Message.Should().Be("Verify failed: No certificate was found.");
    }

    [Fact]
    public async Task The_client_checks_the_servers_name_unless_verify_peer_is_off()
    {
        var server = Load(Server(), TlsEndpoint.Server, verifyPeer: false);
        var client = Load(Issue("client", "client", "CN=alice", server: false, Serial2), TlsEndpoint.Client);
        var (_, c) = await HandshakeAsync(new TlsServerPolicy(server, null, _objects), client, "foo");
        c.Should().BeOfType<TlsException>().Which.Message.Should().Be("Certificate does not match the hostname foo");

        var lax = Load(Path.Combine(_root, "client"), TlsEndpoint.Client, verifyPeer: false);
        (_, c) = await HandshakeAsync(new TlsServerPolicy(server, null, _objects), lax, "foo");
        c.Should().BeNull();
    }

    [Fact]
    public void Loading_checks_our_own_certificates_as_QEMU_does()
    {
        var caAsServer = Issue("ca-server", "server", "CN=localhost", server: true, Serial1, isCA: true);
        FluentActions.Invoking(() => Load(caAsServer, TlsEndpoint.Server)).Should().Throw<BlockException>()
            .WithMessage($"The certificate {caAsServer}/server-cert.pem basic constraints show a CA, but we need one for a server");

        var expired = Issue("expired", "server", "CN=localhost", server: true, Serial2, days: -1);
        FluentActions.Invoking(() => Load(expired, TlsEndpoint.Server)).Should().Throw<BlockException>()
            .WithMessage($"The server certificate {expired}/server-cert.pem has expired");
        TlsCredentialsX509.Load(new TlsX509Options("lax", expired, TlsEndpoint.Server, SanityCheck: false), _objects).Certificate.Should().NotBeNull();

        var mismatched = Issue("mismatch", "server", "CN=localhost", server: true, Serial3);
        File.Copy(Path.Combine(Issue("other", "server", "CN=localhost", server: true, Serial2), "server-key.pem"), Path.Combine(mismatched, "server-key.pem"), overwrite: true);
        FluentActions.Invoking(() => Load(mismatched, TlsEndpoint.Server)).Should().Throw<BlockException>()
            .WithMessage($"Cannot load certificate '{mismatched}/server-cert.pem' & key '{mismatched}/server-key.pem': The certificate and the given key do not match.");

        FluentActions.Invoking(() => Load(Path.Combine(_root, "nowhere"), TlsEndpoint.Client)).Should().Throw<BlockException>()
            .WithMessage($"Unable to access credentials {_root}/nowhere/ca-cert.pem: No such file or directory");
    }
}
