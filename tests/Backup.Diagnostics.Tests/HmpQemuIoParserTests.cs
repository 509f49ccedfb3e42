using Backup.Diagnostics.Hmp;

namespace Backup.Diagnostics.Tests;

/// <summary>QEMU 7.2's monitor (qemu-system-x86_64 human-monitor-command) on each form.</summary>
public class HmpQemuIoParserTests
{
    private const string Try = "\nTry \"help qemu-io\" for more information\n";

    [Theory]
    [InlineData("qemu-io drive0 \"write -P 0xbb 0 512\"", "drive0", "write -P 0xbb 0 512")]
    [InlineData("  qemu-io   drive0   \"write 0 512\"   ", "drive0", "write 0 512")]
    [InlineData("qemu-io\tdrive0\t\"write 0 512\"", "drive0", "write 0 512")]
    [InlineData("qemu-io \"drive0\" \"write 0 512\"", "drive0", "write 0 512")]
    [InlineData("qemu-io drive0 \"write 0 \\\"512\\\"\"", "drive0", "write 0 \"512\"")]
    [InlineData("qemu-io drive0 \"write 0 512\\n\"", "drive0", "write 0 512\n")]
    [InlineData("qemu-io drive0 flush", "drive0", "flush")]
    [InlineData("qemu-io drive0 \"\"", "drive0", "")]
    public void Parsed(string line, string device, string command)
    {
        var p = HmpQemuIoParser.Parse(line);
        p.Reply.Should().BeNull();
        (p.Device, p.Command, p.Qdev).Should().Be((device, command, false));
    }

    [Fact]
    public void Dash_d_names_a_device() => HmpQemuIoParser.Parse("qemu-io -d drive0 \"write 0 512\"").Qdev.Should().BeTrue();

    [Theory]
    [InlineData("qemu-io drive0 write 0 512", "qemu-io: extraneous characters at the end of line" + Try, "")]
    [InlineData("qemu-io drive0 'write 0 512'", "qemu-io: extraneous characters at the end of line" + Try, "")]
    [InlineData("qemu-io -d -d drive0 \"write 0 512\"", "qemu-io: extraneous characters at the end of line" + Try, "")]
    [InlineData("qemu-io drive0 \"write 0 512", "qemu-io: string expected" + Try, "unterminated string\n")]
    [InlineData("qemu-io drive0 \"write 0 \\x\"", "qemu-io: string expected" + Try, "unsupported escape code: '\\x'\n")]
    [InlineData("qemu-io drive0", "qemu-io: string expected" + Try, "")]
    [InlineData("qemu-io", "qemu-io: block device name expected" + Try, "")]
    [InlineData("qemu-io -x drive0 \"write 0 512\"", "qemu-io: unsupported option -x" + Try, "")]
    [InlineData("foo", "unknown command: 'foo'\n", "")]
    [InlineData("info block", "unknown command: 'info'\n", "")]
    public void Refused(string line, string reply, string stdout)
    {
        var p = HmpQemuIoParser.Parse(line);
        p.Reply.Should().Be(reply);
        p.Stdout.Should().Be(stdout);
    }
}
