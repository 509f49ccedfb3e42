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

    [Fact]
    public void The_QMP_session_limit_defaults_to_128_and_is_set_by_option_or_config()
    {
        Parse("--qmp", "unix:/tmp/q.sock").QmpMaxSessions.Should().Be(128);
        Parse("--qmp-max-sessions", "4").QmpMaxSessions.Should().Be(4);
        var config = Path.GetTempFileName();
        try
        {
            File.WriteAllText(config, """{"qmp": "unix:/tmp/q.sock", "qmp-max-sessions": 1000}""");
            Parse("--config", config).QmpMaxSessions.Should().Be(1000);
        }
        finally
        {
            File.Delete(config);
        }
        foreach (var bad in new[] { "0", "-1", "x", "65537", "1.5" })
        {
            FluentActions.Invoking(() => Parse("--qmp-max-sessions", bad)).Should().Throw<CommandLineException>()
                .WithMessage($"--qmp-max-sessions {bad}: expected a number of sessions from 1 to 65536");
        }
    }

    [Theory]
    [InlineData("unrecognized option '--bogus'", "--bogus")]
    [InlineData("--blockdev driver=file,node-name=f: Parameter 'filename' is missing", "--blockdev", "driver=file,node-name=f")]
    [InlineData("--blockdev driver=file,node-name=f,filename=d,read-only=maybe: Parameter 'read-only' expects 'on' or 'off'", "--blockdev", "driver=file,node-name=f,filename=d,read-only=maybe")]
    [InlineData("--chardev socket,id=m: chardev: socket: no host given", "--chardev", "socket,id=m,server=on,wait=off")]
    [InlineData("--chardev socket,id=m,port=4445,server=on,wait=off: chardev: socket: no host given", "--chardev", "socket,id=m,port=4445,server=on,wait=off")]
    [InlineData("--chardev socket,id=m,path=/tmp/x,server=on,tls-creds=t: 'tls_creds' option is incompatible with 'unix' address type", "--chardev", "socket,id=m,path=/tmp/x,server=on,tls-creds=t")]
    [InlineData("--chardev socket,id=m,host=::1,port=1,server=on,tls-authz=a: 'tls_authz' option requires 'tls_creds' option", "--chardev", "socket,id=m,host=::1,port=1,server=on,tls-authz=a")]
    [InlineData("--monitor m9: chardev \"m9\" not found", "--monitor", "m9")]
    [InlineData("option '--pidfile' requires an argument", "--pidfile")]
    [InlineData("option requires an argument -- 'T'", "-T")]
    [InlineData("invalid option -- 'x'", "-x")]
    [InlineData("foo: Unexpected argument", "foo")]
    [InlineData("option '--daemonize' doesn't allow an argument", "--daemonize=on")]
    [InlineData("--chardev socket,id=m,fd=abc,server=on,wait=off: Unable to parse FD number abc", "--chardev", "socket,id=m,fd=abc,server=on,wait=off")]
    [InlineData("--chardev socket,id=m,fd=3,path=/tmp/x,server=on,wait=off: None or one of 'path', 'fd' or 'host' option required.", "--chardev", "socket,id=m,fd=3,path=/tmp/x,server=on,wait=off")]
    [InlineData("--chardev socket,id=m,path=/tmp/x,wait=off: 'wait' option is incompatible with socket in client connect mode", "--chardev", "socket,id=m,path=/tmp/x,wait=off")]
    [InlineData("--chardev socket,id=m,path=/tmp/x,server=on,wait=off,reconnect=1: 'reconnect' option is incompatible with socket in server listen mode", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off,reconnect=1")]
    [InlineData("--chardev socket,id=m,path=/tmp/x,server=maybe: Parameter 'server' expects 'on' or 'off'", "--chardev", "socket,id=m,path=/tmp/x,server=maybe")]
    [InlineData("--chardev socket,id=m,path=/tmp/x,server=on,wait=off,bogus=1: Invalid parameter 'bogus'", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off,bogus=1")]
    [InlineData("--chardev socket,path=/tmp/x,server=on,wait=off: chardev: no id specified", "--chardev", "socket,path=/tmp/x,server=on,wait=off")]
    [InlineData("--chardev socket,id=m,host=127.0.0.1,server=on,wait=off: chardev: socket: no port given", "--chardev", "socket,id=m,host=127.0.0.1,server=on,wait=off")]
    [InlineData("--chardev socket,id=m,host=127.0.0.1,port=abc,server=on,wait=off: address resolution failed for 127.0.0.1:abc: Servname not supported for ai_socktype", "--chardev", "socket,id=m,host=127.0.0.1,port=abc,server=on,wait=off")]
    [InlineData("--chardev socket,id=m,path=/tmp/y,server=on,wait=off: duplicate yank instance", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off", "--chardev", "socket,id=m,path=/tmp/y,server=on,wait=off")]
    [InlineData("--monitor chardev=m,id=mon0: chardev \"m\" not found", "--monitor", "chardev=m,id=mon0", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off")]
    [InlineData("--monitor m: Device 'm' is in use", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off", "--monitor", "m", "--monitor", "m")]
    [InlineData("--monitor m,mode=readline: Only QMP is supported", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off", "--monitor", "m,mode=readline")]
    [InlineData("--monitor m,pretty: Expected '=' after parameter 'pretty'", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off", "--monitor", "m,pretty")]
    [InlineData("--monitor m,bogus=1: Parameter 'bogus' is unexpected", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off", "--monitor", "m,bogus=1")]
    public void Bad_options_name_the_option_and_the_problem(string expected, params string[] args)
    {
        var e = FluentActions.Invoking(() => Parse(args)).Should().Throw<CommandLineException>().Which;
        e.Message.Should().StartWith(expected.Split(':')[0]).And.EndWith(expected.Split(": ")[^1]);
    }

    /// <summary>The texts above that QSD 7.2 prints in full (checked live) are matched in full.</summary>
    [Theory]
    [InlineData("--chardev socket,id=m,path=/tmp/x,wait=off: 'wait' option is incompatible with socket in client connect mode", "--chardev", "socket,id=m,path=/tmp/x,wait=off")]
    [InlineData("--monitor m: Device 'm' is in use", "--chardev", "socket,id=m,path=/tmp/x,server=on,wait=off", "--monitor", "m", "--monitor", "m")]
    [InlineData("invalid option -- 'x'", "-x")]
    public void QSD_texts_are_exact(string expected, params string[] args)
    {
        FluentActions.Invoking(() => Parse(args)).Should().Throw<CommandLineException>().Which.Message.Should().Be(expected);
    }

    [Fact]
    public void Chardev_forms_map_to_listeners_and_connections()
    {
        var o = Parse(
            "--chardev", "socket,id=a,fd=3,server=on,wait=off", "--monitor", "a",
            "--chardev", "socket,id=b,fd=4", "--monitor", "chardev=b,mode=control,pretty=off",
            "--chardev", "socket,id=c,path=/tmp/c.sock", "--monitor", "c",
            "--chardev", "socket,id=d,host=localhost,port=4444", "--monitor", "d",
            "--chardev", "socket,id=e,host=0.0.0.0,port=4445,server=on,wait=off,tls-creds=t,tls-authz=a", "--monitor", "e",
            "--chardev", "socket,id=f,path=/tmp/f.sock,server=on", "--monitor", "f");
        o.QmpEndpoints.Should().Equal(
            new QmpEndpoint.InheritedListener(3), new QmpEndpoint.InheritedConnection(4),
            new QmpEndpoint.UnixConnect("/tmp/c.sock"), new QmpEndpoint.TcpConnect("localhost", 4444),
            new QmpEndpoint.Tcp("0.0.0.0", 4445), new QmpEndpoint.Unix("/tmp/f.sock"));
        // QEMU's default for a server is wait=on; a connection never waits.
        o.Monitors.Select(m => m.Wait).Should().Equal(false, false, false, false, false, true);
        o.Monitors[0].Origin.Should().Be("--chardev socket,id=a,fd=3,server=on,wait=off");
        (o.Monitors[4].TlsCreds, o.Monitors[4].TlsAuthz).Should().Be(("t", "a"));
        o.Monitors[0].TlsCreds.Should().BeNull();
        o.Warnings.Should().BeEmpty();
    }

    [Fact]
    public void Short_form_booleans_work_with_QEMUs_deprecation_warning()
    {
        var o = Parse("--chardev", "socket,id=m,path=/tmp/x.sock,server,nowait", "--monitor", "m");
        o.Monitors.Should().ContainSingle().Which.Should().Be(new MonitorSpec(new QmpEndpoint.Unix("/tmp/x.sock"), false, "--chardev socket,id=m,path=/tmp/x.sock,server,nowait"));
        o.Warnings.Should().Equal(
            "--chardev socket,id=m,path=/tmp/x.sock,server,nowait: warning: short-form boolean option 'server' deprecated\nPlease use server=on instead",
            "--chardev socket,id=m,path=/tmp/x.sock,server,nowait: warning: short-form boolean option 'nowait' deprecated\nPlease use wait=off instead");
    }

    [Fact]
    public void Short_options_take_attached_values_and_nbd_server_takes_an_fd()
    {
        var o = Parse("-Tenable=foo*", "--nbd-server", "addr.type=fd,addr.str=5");
        o.LogLevel.Should().Be(Microsoft.Extensions.Logging.LogLevel.Trace);
        o.StartupCommands.Should().ContainSingle().Which.Arguments.ToJsonString().Should().Be("""{"addr":{"type":"fd","str":"5"}}""");
    }

    [Fact]
    public void Help_lists_every_option_the_parser_accepts()
    {
        CommandLineParser.KnownOptions.Should().HaveCountGreaterThan(10);
        foreach (var option in CommandLineParser.KnownOptions)
        {
            // As an option, not as part of another word: "--export" must not pass because of "--exports".
            HelpText.Text.Should().MatchRegex($@"(^|[\s,]){System.Text.RegularExpressions.Regex.Escape(option)}([\s,=\[]|$)", $"'{option}' is accepted, so --help must list it");
        }
    }
}
