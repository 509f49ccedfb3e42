using System.Text.Json.Nodes;
using Backup.Qmp.Client;

namespace Backup.Ctl.Tests;

/// <summary>Where backupctl looks for the daemon (no daemon needed).</summary>
public sealed class ConnectionTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("ctl-conn-").FullName;

    private static readonly Dictionary<string, string?> NoEnvironment = [];

    private string Config(JsonObject content)
    {
        var path = Path.Combine(_dir, Guid.NewGuid().ToString("N") + ".json");
        File.WriteAllText(path, content.ToJsonString());
        return path;
    }

    [Fact]
    public void Qmp_option_wins() =>
        DaemonConnection.Resolve("tcp:localhost:4444", Config(new JsonObject { ["qmp"] = "unix:/x" }), NoEnvironment)
            .Should().Be(new QmpAddress.Tcp("localhost", 4444));

    [Fact]
    public void Config_qmp_key_string_or_list()
    {
        DaemonConnection.Resolve(null, Config(new JsonObject { ["qmp"] = "unix:/run/a.sock" }), NoEnvironment).Should().Be(new QmpAddress.Unix("/run/a.sock"));
        DaemonConnection.Resolve(null, Config(new JsonObject { ["qmp"] = new JsonArray("tcp:h:1", "unix:/b") }), NoEnvironment).Should().Be(new QmpAddress.Tcp("h", 1));
    }

    [Fact]
    public void Config_chardev_socket()
    {
        DaemonConnection.Resolve(null, Config(new JsonObject { ["chardev"] = "socket,id=m,path=/run/m.sock,server=on,wait=off" }), NoEnvironment)
            .Should().Be(new QmpAddress.Unix("/run/m.sock"));
        DaemonConnection.Resolve(null, Config(new JsonObject { ["chardev"] = new JsonArray("socket,id=m,host=127.0.0.1,port=4000,server=on") }), NoEnvironment)
            .Should().Be(new QmpAddress.Tcp("127.0.0.1", 4000));
    }

    [Fact]
    public void Default_is_the_demo_state_folder()
    {
        DaemonConnection.Resolve(null, null, new Dictionary<string, string?> { ["BACKUPD_STATE_DIR"] = "/srv/state" })
            .Should().Be(new QmpAddress.Unix("/srv/state/qmp.sock"));
        DaemonConnection.Resolve(null, null, NoEnvironment).Should().Be(new QmpAddress.Unix(Path.GetFullPath("state/qmp.sock")));
    }

    [Fact]
    public void Bad_settings_are_usage_errors()
    {
        Invalid(() => DaemonConnection.Resolve("unix", null, NoEnvironment)).Should().Contain("expected 'unix:PATH' or 'tcp:HOST:PORT'");
        Invalid(() => DaemonConnection.Resolve(null, Path.Combine(_dir, "missing.json"), NoEnvironment)).Should().Contain("missing.json");
        Invalid(() => DaemonConnection.Resolve(null, Config(new JsonObject { ["blockdev"] = "x" }), NoEnvironment)).Should().Contain("no QMP socket");
        var notJson = Path.Combine(_dir, "bad.json");
        File.WriteAllText(notJson, "{ nope");
        Invalid(() => DaemonConnection.Resolve(null, notJson, NoEnvironment)).Should().Contain("bad.json");
    }

    private static string Invalid(Func<QmpAddress> resolve)
    {
        var e = FluentActions.Invoking(resolve).Should().Throw<CtlException>().Which;
        e.ExitCode.Should().Be(ExitCodes.Usage);
        return e.Message;
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);
}
