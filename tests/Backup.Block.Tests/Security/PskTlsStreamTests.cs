using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using Backup.Block.Objects;
using Backup.Block.Security;

namespace Backup.Block.Tests.Security;

/// <summary>
/// TLS-PSK through <see cref="TlsChannel"/>, both ends in process over loopback TCP: the key files as
/// QEMU lays them out, many megabytes each way at once (one reader and one writer per end, as the NBD
/// server uses a stream), and the refusals.
/// </summary>
public sealed class PskTlsStreamTests : IDisposable
{
    private const string Key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    private readonly string _root = Path.Combine(Path.GetTempPath(), "psk-" + Guid.NewGuid().ToString("N")[..8]);
    private readonly ObjectRegistry _objects = new();

    public PskTlsStreamTests() => Directory.CreateDirectory(_root);

    public void Dispose() => Directory.Delete(_root, recursive: true);

    private string KeysDir(string name, string contents)
    {
        var dir = Path.Combine(_root, name);
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "keys.psk"), contents);
        return dir;
    }

    private static async Task<(Stream Server, Stream Client)> ConnectAsync(TlsServerPolicy server, TlsCredentials client, TcpClient c, TcpClient s,
        CancellationToken ct)
    {
        var serving = TlsChannel.AcceptAsync(s.GetStream(), server, ct).AsTask();
        var connecting = TlsChannel.ConnectAsync(c.GetStream(), client, null, ct).AsTask();
        await Task.WhenAll(serving, connecting);
        return (serving.Result, connecting.Result);
    }

    private static async Task<(TcpClient Client, TcpClient Server)> TcpPairAsync()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        var c = new TcpClient();
        await c.ConnectAsync(IPAddress.Loopback, ((IPEndPoint)listener.LocalEndpoint).Port);
        return (c, await listener.AcceptTcpClientAsync());
    }

    [Fact]
    public async Task Both_ends_exchange_megabytes_each_way_at_once()
    {
        var dir = KeysDir("ok", $"other:ffee\nqemu:{Key}\n");
        var server = new TlsServerPolicy(TlsCredentialsPsk.Create("s", dir, TlsEndpoint.Server, null), null, _objects);
        var client = TlsCredentialsPsk.Create("c", dir, TlsEndpoint.Client, null);
        var (c, s) = await TcpPairAsync();
        using var _c = c;
        using var _s = s;
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        var (serverStream, clientStream) = await ConnectAsync(server, client, c, s, timeout.Token);
        await using var _ss = serverStream;
        await using var _cs = clientStream;

        var up = RandomNumberGenerator.GetBytes(6 << 20);
        var down = RandomNumberGenerator.GetBytes(5 << 20);
        async Task<byte[]> ReceiveAsync(Stream stream, int length)
        {
            var buffer = new byte[length];
            await stream.ReadExactlyAsync(buffer, timeout.Token);
            return buffer;
        }
        async Task SendAsync(Stream stream, byte[] data)
        {
            // Uneven pieces, so records and reads do not line up.
            for (var offset = 0; offset < data.Length;)
            {
                var n = Math.Min(data.Length - offset, 1 + (offset % 100_003));
                await stream.WriteAsync(data.AsMemory(offset, n), timeout.Token);
                offset += n;
            }
        }
        var receivedUp = ReceiveAsync(serverStream, up.Length);
        var receivedDown = ReceiveAsync(clientStream, down.Length);
        await Task.WhenAll(SendAsync(clientStream, up), SendAsync(serverStream, down));
        (await receivedUp).Should().Equal(up);
        (await receivedDown).Should().Equal(down);
        ((PskTlsStream)serverStream).PeerIdentity.Should().Be("qemu");

        await clientStream.DisposeAsync();
        (await serverStream.ReadAsync(new byte[16], timeout.Token)).Should().Be(0, "close_notify ends the server's stream");
    }

    [Fact]
    public async Task A_wrong_key_an_unknown_name_and_authz_are_refused()
    {
        var serverDir = KeysDir("server", $"qemu:{Key}\nguest:{Key[..32]}\n");
        var wrongKey = TlsCredentialsPsk.Create("w", KeysDir("wrong", $"qemu:{Key[..32]}\n"), TlsEndpoint.Client, null);
        var stranger = TlsCredentialsPsk.Create("x", KeysDir("stranger", $"stranger:{Key}\n"), TlsEndpoint.Client, "stranger");
        var guest = TlsCredentialsPsk.Create("g", serverDir, TlsEndpoint.Client, "guest");
        _objects.TryAdd("az", new AuthzSimple("az", "qemu")).Should().BeTrue();
        var open = new TlsServerPolicy(TlsCredentialsPsk.Create("s", serverDir, TlsEndpoint.Server, null), null, _objects);
        var onlyQemu = open with { AuthzId = "az" };

        async Task<Exception> RefusedAsync(TlsServerPolicy policy, TlsCredentials client)
        {
            var (c, s) = await TcpPairAsync();
            using var _c = c;
            using var _s = s;
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            var serving = TlsChannel.AcceptAsync(s.GetStream(), policy, timeout.Token).AsTask();
            var connecting = TlsChannel.ConnectAsync(c.GetStream(), client, null, timeout.Token).AsTask();
            var error = await Record.ExceptionAsync(() => serving);
            s.Close();
            _ = await Record.ExceptionAsync(() => connecting);
            return error!;
        }

        (await RefusedAsync(open, wrongKey)).Should().BeOfType<TlsException>().Which.Message.Should().StartWith("TLS handshake failed:");
        (await RefusedAsync(open, stranger)).Message.Should().Be("TLS handshake failed: Unknown PSK username stranger");
        (await RefusedAsync(onlyQemu, guest)).Message.Should().Be("TLS PSK authz check for guest is denied");
    }

    [Fact]
    public void Key_files_are_checked_as_QEMU_checks_them()
    {
        var dir = KeysDir("bad", "qemu:zz\n");
        FluentActions.Invoking(() => TlsCredentialsPsk.Create("a", dir, TlsEndpoint.Server, "qemu"))
            .Should().Throw<BlockException>().WithMessage("username should not be set when endpoint=server");
        FluentActions.Invoking(() => TlsCredentialsPsk.Create("b", dir, TlsEndpoint.Client, "nobody"))
            .Should().Throw<BlockException>().WithMessage($"Username nobody not found in PSK file {dir}/keys.psk");
        FluentActions.Invoking(() => TlsCredentialsPsk.Create("c", dir, TlsEndpoint.Client, null))
            .Should().Throw<BlockException>().WithMessage($"Cannot decode hex key for qemu in {dir}/keys.psk");
        FluentActions.Invoking(() => TlsCredentialsPsk.Create("d", null, TlsEndpoint.Client, null))
            .Should().Throw<BlockException>().WithMessage("Missing 'dir' property value");
        TlsCredentialsPsk.Create("e", dir, TlsEndpoint.Server, null).Username.Should().Be("qemu");
    }
}
