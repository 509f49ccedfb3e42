using Backup.Block;
using Backup.Daemon.CommandLine;
using Backup.Qmp.Schema;
using Backup.Qmp.Server;

namespace Backup.Daemon.Tests;

public class CommandLineTests
{
    private static DaemonOptions Parse(params string[] args) => new CommandLineParser(SchemaLoader.Default).Parse(args);

    [Fact]
    public void Key_value_syntax_nests_dotted_keys_and_escapes_commas()
    {
        var o = KeyValueSyntax.Parse("raw,node-name=d0,file.driver=file,file.filename=a,,b.img", "driver");
        o.ToJsonString().Should().Be("""{"driver":"raw","node-name":"d0","file":{"driver":"file","filename":"a,b.img"}}""");
        FluentActions.Invoking(() => KeyValueSyntax.Parse("a=1,b", null)).Should().Throw<BlockException>().WithMessage("Expected '=' after parameter 'b'");
        FluentActions.Invoking(() => KeyValueSyntax.Parse("a=1,a.b=2", null)).Should().Throw<BlockException>().WithMessage("Parameter 'a' used inconsistently");
    }

    [Fact]
    public void QSD_command_line_forms_become_validated_startup_commands()
    {
        var o = Parse("--blockdev", "driver=file,node-name=file0,filename=d.img",
            "--blockdev", """{"driver":"raw","node-name":"drive0","file":"file0"}""",
            "--chardev", "socket,id=m0,path=/tmp/q.sock,server=on,wait=off", "--monitor", "chardev=m0",
            "--chardev", "socket,id=m1,host=127.0.0.1,port=4444,server=on,wait=off", "--monitor", "m1",
            "--object", "secret,id=s0,data=abc", "--pidfile", "/tmp/p", "--nbd-server", "addr.type=unix,addr.path=/tmp/n.sock");
        o.StartupCommands.Select(c => c.Command).Should().Equal("blockdev-add", "blockdev-add", "object-add", "nbd-server-start");
        o.QmpEndpoints.Should().Equal(new QmpEndpoint.Unix("/tmp/q.sock"), new QmpEndpoint.Tcp("127.0.0.1", 4444));
        o.PidFile.Should().Be("/tmp/p");
        o.DemoMode.Should().BeFalse();
        Parse().DemoMode.Should().BeTrue();
    }

    [Theory]
    [InlineData("unrecognized option '--bogus'", "--bogus")]
    [InlineData("--blockdev driver=file,node-name=f: Parameter 'filename' is missing", "--blockdev", "driver=file,node-name=f")]
    [InlineData("--blockdev driver=file,node-name=f,filename=d,read-only=maybe: Parameter 'read-only' expects 'on' or 'off'", "--blockdev", "driver=file,node-name=f,filename=d,read-only=maybe")]
    [InlineData("--chardev socket,id=m: chardev: socket: no host given", "--chardev", "socket,id=m,server=on,wait=off")]
    [InlineData("--monitor m9: chardev \"m9\" not found", "--monitor", "m9")]
    [InlineData("option '--pidfile' requires an argument", "--pidfile")]
    public void Bad_options_name_the_option_and_the_problem(string expected, params string[] args)
    {
        var e = FluentActions.Invoking(() => Parse(args)).Should().Throw<CommandLineException>().Which;
        e.Message.Should().StartWith(expected.Split(':')[0]).And.EndWith(expected.Split(": ")[^1]);
    }
}
