using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Backup.IntegrationTests.Support;
using QmpClientLib = Backup.Qmp.Client.QmpClient;

namespace Backup.Qmp.Client.Tests;

/// <summary>The client against the real backupd process.</summary>
public sealed class ClientTests : IAsyncLifetime
{
    private DaemonProcess? _daemon;

    private DaemonProcess Daemon => _daemon!;

    public async Task InitializeAsync()
    {
        var dir = DaemonProcess.NewDirectory();
        var image = Path.Combine(dir, "disk.img");
        await using (var f = File.Create(image))
        {
            f.SetLength(16 << 20);
        }
        _daemon = await DaemonProcess.StartAsync(["--blockdev", $"driver=file,node-name=drive0,filename={image}"], dir);
        // The socket file appears at bind(), a moment before listen(): wait until it answers.
        await (await Daemon.ConnectAsync()).DisposeAsync();
    }

    public async Task DisposeAsync()
    {
        if (_daemon is not null)
        {
            await _daemon.DisposeAsync();
        }
    }

    private Task<QmpClientLib> ConnectAsync(bool negotiate = true) =>
        QmpClientLib.ConnectAsync(new QmpAddress.Unix(Daemon.QmpSocket), negotiate);

    [Fact]
    public async Task Greeting_negotiation_and_a_command()
    {
        await using var qmp = await ConnectAsync();
        qmp.Greeting["QMP"]!["capabilities"]!.AsArray().Select(c => c!.GetValue<string>()).Should().Equal("oob");
        var version = await qmp.ExecuteAsync("query-version");
        version!["qemu"]!["major"]!.GetValue<int>().Should().Be(7);
        version["package"]!.GetValue<string>().Should().StartWith("backupd ");
    }

    [Fact]
    public async Task Before_negotiation_commands_are_refused_as_QSD_refuses_them()
    {
        await using var qmp = await ConnectAsync(negotiate: false);
        var e = await FluentActions.Awaiting(() => qmp.ExecuteAsync("query-version")).Should().ThrowAsync<QmpErrorException>();
        e.Which.Class.Should().Be("CommandNotFound");
        e.Which.Desc.Should().Be("Expecting capabilities negotiation with 'qmp_capabilities'");
        await qmp.ExecuteAsync("qmp_capabilities");
        (await qmp.ExecuteAsync("query-jobs"))!.AsArray().Should().BeEmpty();
    }

    [Fact]
    public async Task Errors_are_typed_with_class_and_desc()
    {
        await using var qmp = await ConnectAsync();
        var e = await FluentActions.Awaiting(() => qmp.ExecuteAsync("no-such")).Should().ThrowAsync<QmpErrorException>();
        e.Which.Class.Should().Be("CommandNotFound");
        e.Which.Desc.Should().Be("The command no-such has not been found");
        e.Which.Command.Should().Be("no-such");

        var g = await FluentActions.Awaiting(() => qmp.ExecuteAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = "nope", ["name"] = "b" }))
            .Should().ThrowAsync<QmpErrorException>();
        g.Which.Class.Should().Be("GenericError");
        g.Which.Desc.Should().Be("Cannot find device='nope' nor node-name='nope'");
    }

    [Fact]
    public async Task Concurrent_commands_get_their_own_replies()
    {
        await using var qmp = await ConnectAsync();
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new JsonObject { ["node"] = "drive0", ["name"] = "b" });
        // Alternating successes and failures from many tasks: each caller must get the reply to its own command.
        var tasks = Enumerable.Range(0, 60).Select(async i =>
        {
            if (i % 2 == 0)
            {
                var nodes = await qmp.ExecuteAsync("query-named-block-nodes", new JsonObject { ["flat"] = true });
                return nodes is JsonArray;
            }
            try
            {
                await qmp.ExecuteAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = "drive0", ["name"] = $"missing{i}" });
                return false;
            }
            catch (QmpErrorException e)
            {
                return e.Desc == $"Dirty bitmap 'missing{i}' not found";
            }
        });
        (await Task.WhenAll(tasks)).Should().AllSatisfy(ok => ok.Should().BeTrue());
    }

    [Fact]
    public async Task Events_arrive_in_order_and_can_be_waited_for()
    {
        await using var qmp = await ConnectAsync();
        using var listener = qmp.Listen();
        var image = Path.Combine(Daemon.Directory, "x.img");
        await qmp.ExecuteAsync("blockdev-create", new JsonObject
        {
            ["job-id"] = "c1",
            ["options"] = new JsonObject { ["driver"] = "file", ["filename"] = image, ["size"] = 0 },
        });
        var concluded = await qmp.Events.WaitForAsync("JOB_STATUS_CHANGE", TimeSpan.FromSeconds(30), e => e.GetString("status") == "concluded");
        concluded.Data["id"]!.GetValue<string>().Should().Be("c1");
        concluded.Timestamp.Should().BeCloseTo(DateTimeOffset.UtcNow, TimeSpan.FromMinutes(1));

        // The second listener saw every event too, in QSD's order.
        var statuses = new List<string>();
        while (listener.TryNext(out var e))
        {
            statuses.Add(e!.GetString("status")!);
        }
        statuses.Should().Equal("created", "running", "waiting", "pending", "concluded");
        File.Exists(image).Should().BeTrue();
    }

    [Fact]
    public async Task Waiting_for_an_event_that_does_not_come_times_out()
    {
        await using var qmp = await ConnectAsync();
        await FluentActions.Awaiting(() => qmp.Events.WaitForAsync("BLOCK_JOB_COMPLETED", TimeSpan.FromMilliseconds(200)))
            .Should().ThrowAsync<TimeoutException>();
    }

    [Fact]
    public async Task Quit_closes_the_connection_and_ends_the_event_stream()
    {
        await using var qmp = await ConnectAsync();
        await qmp.ExecuteAsync("quit");
        var all = new List<QmpEvent>();
        await foreach (var e in qmp.Events.ReadAllAsync())
        {
            all.Add(e);
        }
        qmp.IsClosed.Should().BeTrue();
        await FluentActions.Awaiting(() => qmp.ExecuteAsync("query-version")).Should().ThrowAsync<QmpConnectionException>();
        (await Daemon.WaitForExitAsync(TimeSpan.FromSeconds(20))).Should().Be(0);
    }

    [Fact]
    public async Task No_server_is_a_connection_error()
    {
        var missing = new QmpAddress.Unix(Path.Combine(Daemon.Directory, "nobody.sock"));
        await FluentActions.Awaiting(() => QmpClientLib.ConnectAsync(missing)).Should().ThrowAsync<QmpConnectionException>()
            .WithMessage("cannot connect to unix:*nobody.sock*");
    }

    [Fact]
    public async Task Tcp()
    {
        int port;
        using (var probe = new TcpListener(IPAddress.Loopback, 0))
        {
            probe.Start();
            port = ((IPEndPoint)probe.LocalEndpoint).Port;
        }
        await using var tcpDaemon = await DaemonProcess.StartAsync(["--qmp", $"tcp:127.0.0.1:{port}"], addMonitor: false);
        QmpClientLib? qmp = null;
        for (var i = 0; qmp is null; i++)
        {
            try
            {
                qmp = await QmpClientLib.ConnectAsync(QmpAddress.Parse($"tcp:127.0.0.1:{port}"));
            }
            catch (QmpConnectionException) when (i < 200 && !tcpDaemon.HasExited)
            {
                await Task.Delay(50);
            }
        }
        await using (qmp)
        {
            (await qmp.ExecuteAsync("query-version"))!["package"]!.GetValue<string>().Should().StartWith("backupd");
        }
    }

    [Theory]
    [InlineData("unix:/run/x.sock", "unix:/run/x.sock")]
    [InlineData("tcp:localhost:4444", "tcp:localhost:4444")]
    [InlineData("tcp:[::1]:4444", "tcp:::1:4444")]
    public void Addresses_parse_in_backupds_spelling(string text, string back) =>
        QmpAddress.Parse(text).ToString().Should().Be(back);

    [Theory]
    [InlineData("unix:")]
    [InlineData("tcp:host")]
    [InlineData("tcp:host:99999")]
    [InlineData("/run/x.sock")]
    public void Bad_addresses_are_refused(string text) =>
        FluentActions.Invoking(() => QmpAddress.Parse(text)).Should().Throw<FormatException>();
}
