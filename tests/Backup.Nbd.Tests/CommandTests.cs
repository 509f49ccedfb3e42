using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Bitmaps;
using Backup.Nbd.Commands;
using Backup.Nbd.Exports;
using Backup.Nbd.Server;
using Backup.Nbd.Tests.Support;
using Backup.Qmp.Commands;
using Backup.Qmp.Schema;

namespace Backup.Nbd.Tests;

/// <summary>The QMP commands of schemas/nbd.json: schema agreement, results and qemu-storage-daemon 7.2's error texts.</summary>
public sealed class CommandTests
{
    private sealed class Qmp
    {
        private readonly CommandTable _table = new();

        public Qmp(NbdServer server) => new NbdCommands(server).Register(_table);

        public async Task<JsonNode?> RunAsync(string command, string arguments = "{}")
        {
            var def = SchemaLoader.Default.Commands[command];
            var args = InputValidator.ValidateArguments(JsonNode.Parse(arguments)!.AsObject(), def.Arguments);
            _table.TryGet(command, out var handler).Should().BeTrue();
            return await handler(args, new CommandContext(null), CancellationToken.None);
        }

        public async Task<string> ErrorAsync(string command, string arguments = "{}")
        {
            var act = async () => await RunAsync(command, arguments);
            return (await act.Should().ThrowAsync<BlockException>()).Which.Message;
        }

        public IReadOnlyCollection<string> Names => _table.Names;
    }

    private static string StartArgs(NbdFixture f) =>
        UnixAddr(f.SocketPath);

    private static string UnixAddr(string path) =>
        new JsonObject { ["addr"] = new JsonObject { ["type"] = "unix", ["data"] = new JsonObject { ["path"] = path } } }.ToJsonString();

    [Fact]
    public async Task Every_nbd_schema_command_has_a_handler_and_the_event_is_declared()
    {
        await using var f = NbdFixture.Create(start: false);
        var schema = SchemaLoader.Default;
        var declared = schema.Commands.Values.Where(c => c.Module == "nbd").Select(c => c.Name);
        new Qmp(f.Server).Names.Should().BeEquivalentTo(declared);
        declared.Should().BeEquivalentTo("nbd-server-start", "nbd-server-stop", "nbd-server-add", "nbd-server-remove",
            "block-export-add", "block-export-del", "query-block-exports");
        schema.Events.Should().ContainKey("BLOCK_EXPORT_DELETED");
        schema.Types.Should().ContainKey("NbdServerOptions");
    }

    [Fact]
    public async Task Errors_match_qemu_storage_daemon()
    {
        await using var f = NbdFixture.Create(start: false);
        await f.AddRawNodeAsync("d0", 1 << 20);
        await f.AddRawNodeAsync("ro", 1 << 20, readOnly: true);
        var q = new Qmp(f.Server);

        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"d0"}""")).Should().Be("NBD server not running");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"nosuch"}""")).Should().Be("Cannot find device='' nor node-name='nosuch'");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e 0","node-name":"nosuch"}""")).Should().Be("Invalid block export id");
        (await q.ErrorAsync("nbd-server-stop")).Should().Be("NBD server not running");
        (await q.ErrorAsync("nbd-server-add", """{"device":"d0"}""")).Should().Be("NBD server not running");
        (await q.ErrorAsync("nbd-server-add", """{"device":"nosuch"}""")).Should().Be("Cannot find device='nosuch' nor node-name='nosuch'");
        (await q.ErrorAsync("nbd-server-remove", """{"name":"d0"}""")).Should().Be("Export 'd0' is not found");
        (await q.ErrorAsync("nbd-server-start", """{"addr":{"type":"fd","data":{"str":"foo"}}}""")).Should().Be("only QEMU supports file descriptor passing");
        (await q.ErrorAsync("nbd-server-start", """{"addr":{"type":"unix","data":{"path":"/nonexist/x.sock"}}}"""))
            .Should().Be("Failed to bind socket to /nonexist/x.sock: No such file or directory");
        (await q.ErrorAsync("nbd-server-start", """{"addr":{"type":"inet","data":{"host":"nosuch.invalid","port":"1"}}}"""))
            .Should().Be("address resolution failed for nosuch.invalid:1: Name or service not known");
        (await q.ErrorAsync("nbd-server-start", StartArgs(f)[..^1] + ""","tls-creds":"x"}""")).Should().Be("No TLS credentials with id 'x'");
        f.Server.IsRunning.Should().BeFalse();

        await q.RunAsync("nbd-server-start", StartArgs(f));
        (await q.ErrorAsync("nbd-server-start", StartArgs(f))).Should().Be("NBD server already running");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"ro","writable":true}""")).Should().Be("Cannot export read-only node as writable");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"d0","iothread":"x"}""")).Should().Be("iothread \"x\" not found");
        await q.RunAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"d0","fixed-iothread":true}""");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"d0"}""")).Should().Be("Block export id 'e0' is already in use");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e1","node-name":"d0"}""")).Should().Be("NBD server already has export named 'd0'");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e2","node-name":"d0","name":"d0"}""")).Should().Be("NBD server already has export named 'd0'");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e3","node-name":"d0","name":"x","bitmaps":["nosuch"]}""")).Should().Be("Bitmap 'nosuch' is not found");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e3","node-name":"d0","name":"x","bitmaps":[{"node":"nosuch","name":"b"}]}""")).Should().Be("Node 'nosuch' not found");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e3","node-name":"d0","name":"x","bitmaps":[{"node":"d0","name":"b"}]}""")).Should().Be("Dirty bitmap 'b' not found");
        var longName = new string('x', 4097);
        (await q.ErrorAsync("block-export-add", $$"""{"type":"nbd","id":"e3","node-name":"d0","name":"{{longName}}"}""")).Should().Be($"export name '{longName}' too long");
        (await q.ErrorAsync("block-export-add", $$"""{"type":"nbd","id":"e3","node-name":"d0","name":"x","description":"{{longName}}"}""")).Should().Be($"description '{longName}' too long");
        (await q.ErrorAsync("nbd-server-add", """{"device":"d0","name":"e 0"}""")).Should().Be("Invalid block export id");
        (await q.ErrorAsync("block-export-del", """{"id":"nosuch"}""")).Should().Be("Export 'nosuch' is not found");

        var node = f.Graph.Find("d0")!;
        var del = async () => await f.Graph.RemoveAsync("d0");
        (await del.Should().ThrowAsync<BlockException>()).Which.Message.Should().Be("Node d0 is in use"); // QSD 7.2: bdrv_has_blk, checked first
        node.BusyReason.Should().NotBeNull();
    }

    [Fact]
    public async Task Exports_are_listed_removed_with_events_and_stopped_with_the_server()
    {
        await using var f = NbdFixture.Create(start: false);
        await f.AddRawNodeAsync("d0", 1 << 20);
        await f.AddRawNodeAsync("q1", 1 << 20);
        var q = new Qmp(f.Server);
        await q.RunAsync("nbd-server-start", StartArgs(f));
        await q.RunAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"d0","writable":true,"writethrough":true,"allocation-depth":true}""");
        await q.RunAsync("nbd-server-add", """{"device":"q1"}""");
        (await q.ErrorAsync("nbd-server-add", """{"device":"q1"}""")).Should().Be("Block export id 'q1' is already in use");
        await q.RunAsync("nbd-server-add", """{"device":"q1","name":"zz","writable":true,"description":"legacy"}""");

        var list = (await q.RunAsync("query-block-exports"))!.AsArray();
        list.ToJsonString().Should().Be(
            """[{"id":"zz","type":"nbd","node-name":"q1","shutting-down":false},{"id":"q1","type":"nbd","node-name":"q1","shutting-down":false},{"id":"e0","type":"nbd","node-name":"d0","shutting-down":false}]""");

        await q.RunAsync("nbd-server-remove", """{"name":"q1"}""");
        f.Events.DeletedExportIds.Should().Equal("q1");
        await q.RunAsync("block-export-del", """{"id":"e0","mode":"hard"}""");
        (await q.ErrorAsync("block-export-del", """{"id":"e0"}""")).Should().Be("Export 'e0' is not found");
        await f.Graph.RemoveAsync("d0");

        await q.RunAsync("nbd-server-stop");
        f.Events.DeletedExportIds.Should().Equal("q1", "e0", "zz");
        (await q.RunAsync("query-block-exports"))!.AsArray().Should().BeEmpty();
        (await q.ErrorAsync("nbd-server-stop")).Should().Be("NBD server not running");
        File.Exists(f.SocketPath).Should().BeFalse();

        // The server can start again, here with the flat address form of --nbd-server and TCP port 0.
        NbdCommands.StartFromOptions(f.Server, JsonNode.Parse("""{"addr":{"type":"inet","host":"127.0.0.1","port":"0"},"max-connections":1}""")!.AsObject());
        f.Server.LocalEndPoint.Should().BeOfType<System.Net.IPEndPoint>().Which.Port.Should().BePositive();
        await q.RunAsync("nbd-server-stop");
    }

    [Fact]
    public async Task Max_connections_one_withholds_multi_conn_and_tcp_works()
    {
        await using var f = NbdFixture.Create(start: false);
        await f.AddRawNodeAsync("d0", 1 << 20);
        f.Server.Start(new NbdInetAddress("127.0.0.1", "0"), maxConnections: 1);
        f.Export("e0", "d0");
        var port = ((System.Net.IPEndPoint)f.Server.LocalEndPoint!).Port;
        var r = await Tools.MustRunAsync("nbdinfo", "--json", $"nbd://127.0.0.1:{port}/d0");
        r.Stdout.Should().Contain("\"can_multi_conn\": false");
    }

    /// <summary>A stand-in for the bitmap module: one bitmap 'b0', dirty in its first 64 KiB.</summary>
    private sealed class FakeBitmaps : IMetaContextProvider
    {
        public int Open;

        public IExportMetaContext OpenBitmap(BlockNode exportNode, ExportBitmapReference bitmap, bool writableExport)
        {
            if (bitmap.Name != "b0")
            {
                throw new BlockException($"Bitmap '{bitmap.Name}' is not found");
            }
            if (!writableExport && bitmap.Node == "enabled")
            {
                throw new BlockException("Enabled bitmap 'b0' incompatible with readonly export");
            }
            Interlocked.Increment(ref Open);
            return new Context(this);
        }

        private sealed class Context(FakeBitmaps owner) : IExportMetaContext, IDisposable
        {
            public string Name => "qemu:dirty-bitmap:b0";

            public ValueTask GetExtentsAsync(long offset, long length, int maxExtents, List<MetaExtent> extents, CancellationToken cancellationToken)
            {
                var dirtyEnd = 65536L;
                if (offset < dirtyEnd)
                {
                    extents.Add(new MetaExtent(Math.Min(dirtyEnd - offset, length), 1));
                }
                var rest = offset + length - Math.Max(offset, dirtyEnd);
                if (rest > 0 && extents.Count < maxExtents)
                {
                    extents.Add(new MetaExtent(rest, 0));
                }
                return ValueTask.CompletedTask;
            }

            public void Dispose() => Interlocked.Decrement(ref owner.Open);
        }
    }

    [Fact]
    public async Task Dirty_bitmap_contexts_come_from_the_provider()
    {
        var dir = Path.Combine("/tmp", "nbdb-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(dir);
        var graph = BlockGraph.CreateDefault();
        var events = new TestEvents();
        var bitmaps = new FakeBitmaps();
        await using var server = new NbdServer(graph, events, bitmapProvider: bitmaps);
        try
        {
            var file = Path.Combine(dir, "d.img");
            await using (var fs = File.Create(file))
            {
                fs.SetLength(1 << 20);
            }
            await graph.AddAsync(new BlockOptions { ["driver"] = "raw", ["node-name"] = "d0", ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = file } });
            var sock = Path.Combine(dir, "s");
            var q = new Qmp(server);
            await q.RunAsync("nbd-server-start", UnixAddr(sock));
            (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"d0","bitmaps":["b0","nosuch"]}""")).Should().Be("Bitmap 'nosuch' is not found");
            bitmaps.Open.Should().Be(0, "a failed export releases the bitmaps it had opened");
            (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"e0","node-name":"d0","bitmaps":[{"node":"enabled","name":"b0"}]}"""))
                .Should().Be("Enabled bitmap 'b0' incompatible with readonly export");
            await q.RunAsync("nbd-server-add", """{"device":"d0","bitmap":"b0"}""");
            bitmaps.Open.Should().Be(1);

            var uri = $"nbd+unix:///d0?socket={sock}";
            var info = await Tools.MustRunAsync("nbdinfo", "--json", uri);
            info.Stdout.Should().Contain("qemu:dirty-bitmap:b0");
            var map = await Tools.MustRunAsync("nbdinfo", "--map=qemu:dirty-bitmap:b0", uri);
            map.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => string.Join(' ', l.Split(' ', StringSplitOptions.RemoveEmptyEntries)))
                .Should().Equal("0 65536 1 dirty", "65536 983040 0 clean");

            await q.RunAsync("nbd-server-stop");
            bitmaps.Open.Should().Be(0);
        }
        finally
        {
            await graph.CloseAllAsync();
            Directory.Delete(dir, true);
        }
    }

    [Fact]
    public async Task Real_dirty_bitmaps_are_exported_busy_and_see_writes_through_the_export()
    {
        await using var f = NbdFixture.Create();
        var (node, _) = await f.AddRawNodeAsync("d0", 4 << 20);
        var bitmaps = node.GetDirtyBitmaps();
        var b0 = bitmaps.Add("b0", granularity: 65536);
        var frozen = bitmaps.Add("b1", granularity: 65536, disabled: true);
        var q = new Qmp(f.Server);

        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"r","node-name":"d0","bitmaps":["b0"]}"""))
            .Should().Be("Enabled bitmap 'b0' incompatible with readonly export");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"r","node-name":"d0","bitmaps":["nosuch"]}""")).Should().Be("Bitmap 'nosuch' is not found");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"r","node-name":"d0","bitmaps":[{"node":"nosuch","name":"b0"}]}""")).Should().Be("Node 'nosuch' not found");
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"r","node-name":"d0","bitmaps":[{"node":"d0","name":"x"}]}""")).Should().Be("Dirty bitmap 'x' not found");
        await q.RunAsync("block-export-add", """{"type":"nbd","id":"r","node-name":"d0","name":"ro","bitmaps":[{"node":"d0","name":"b1"}]}""");
        frozen.Busy.Should().BeTrue();
        (await q.ErrorAsync("block-export-add", """{"type":"nbd","id":"r2","node-name":"d0","name":"ro2","bitmaps":["b1"]}"""))
            .Should().Be("Bitmap 'b1' is currently in use by another operation and cannot be used");

        await q.RunAsync("block-export-add", """{"type":"nbd","id":"w","node-name":"d0","name":"rw","writable":true,"bitmaps":["b0"]}""");
        b0.Busy.Should().BeTrue();
        await Tools.MustRunAsync("qemu-io", "-f", "raw", f.Uri("rw"), "-c", "write -P 0x11 1M 4k", "-c", "write -P 0x22 3M 128k");
        var map = await Tools.MustRunAsync("nbdinfo", "--map=qemu:dirty-bitmap:b0", f.Uri("rw"));
        map.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => string.Join(' ', l.Split(' ', StringSplitOptions.RemoveEmptyEntries)))
            .Should().Equal("0 1048576 0 clean", "1048576 65536 1 dirty", "1114112 2031616 0 clean", "3145728 131072 1 dirty", "3276800 917504 0 clean");
        var clean = await Tools.MustRunAsync("nbdinfo", "--map=qemu:dirty-bitmap:b1", f.Uri("ro"));
        clean.Stdout.Trim().Split(' ', StringSplitOptions.RemoveEmptyEntries).Should().Equal("0", "4194304", "0", "clean");

        await q.RunAsync("nbd-server-stop");
        b0.Busy.Should().BeFalse();
        frozen.Busy.Should().BeFalse();
    }
}
