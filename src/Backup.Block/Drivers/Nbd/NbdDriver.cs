using Backup.Block.Security;
using Backup.Nbd.Protocol;

namespace Backup.Block.Drivers.Nbd;

/// <summary>
/// The <c>nbd</c> protocol driver (QEMU 7.2's block/nbd.c): a node whose data lives on an NBD server.
/// Options as QEMU's BlockdevOptionsNbd: <c>server</c> (unix path or inet host and port; fd is refused as
/// QSD refuses it), <c>export</c>, <c>tls-creds</c>, <c>tls-hostname</c>, <c>x-dirty-bitmap</c> (a metadata
/// context name, e.g. qemu:dirty-bitmap:NAME, read instead of base:allocation), <c>reconnect-delay</c> and
/// <c>open-timeout</c> (seconds).
/// </summary>
public sealed class NbdDriver : IBlockDriver
{
    public string Name => "nbd";

    public async ValueTask<BlockNode> OpenAsync(NodeContext context, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(context);
        var o = context.Options;
        var server = o.GetDict("server") ?? throw new BlockException("Parameter 'server' is missing");
        var address = ParseAddress(server);
        var export = o.GetString("export");
        INbdClientTls? tls = null;
        if (o.GetString("tls-creds") is { } creds)
        {
            // QEMU checks the server's name against tls-hostname, else the inet host; a Unix socket has none to check.
            var hostname = o.GetString("tls-hostname") ?? (address as NbdClientInetAddress)?.Host;
            tls = new NbdClientTls(TlsCredentials.Find(context.Graph.Objects, creds, TlsEndpoint.Client), hostname);
        }
        var options = new NbdClientOptions
        {
            Address = address,
            Export = export ?? "",
            MetaContext = o.GetString("x-dirty-bitmap") ?? NbdWire.BASE_ALLOCATION,
            ReconnectDelay = TimeSpan.FromSeconds(o.GetInt64("reconnect-delay") ?? 0),
            OpenTimeout = TimeSpan.FromSeconds(o.GetInt64("open-timeout") ?? 0),
            Tls = tls,
        };
        return await NbdNode.OpenAsync(context, options, NbdFilename.Format(address, export), cancellationToken).ConfigureAwait(false);
    }

    private static NbdClientAddress ParseAddress(BlockOptions server) => server.GetString("type") switch
    {
        "unix" => server.GetBool("abstract") == true
            ? throw new BlockException("abstract Unix socket addresses are not supported by the nbd driver")
            : new NbdClientUnixAddress(server.GetString("path") ?? throw new BlockException("Parameter 'server.path' is missing")),
        "inet" => new NbdClientInetAddress(
            server.GetString("host") ?? throw new BlockException("Parameter 'server.host' is missing"),
            server.GetString("port") ?? throw new BlockException("Parameter 'server.port' is missing")),
        "fd" => throw new BlockException("only QEMU supports file descriptor passing"),
        "vsock" => throw new BlockException("vsock sockets are not supported by the nbd driver"),
        var t => throw new BlockException($"Parameter 'server.type' does not accept value '{t}'"),
    };
}
