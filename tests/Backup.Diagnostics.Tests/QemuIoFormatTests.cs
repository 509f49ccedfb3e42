using Backup.Diagnostics.QemuIo;

namespace Backup.Diagnostics.Tests;

/// <summary>Forms copied from qemu-io 7.2's output (see the live runs in the commit that added them).</summary>
public class QemuIoFormatTests
{
    [Theory]
    [InlineData(512d, "512 bytes")]
    [InlineData(30d, "30 bytes")]
    [InlineData(0d, "0 bytes")]
    [InlineData(941.126868, "941.126868 bytes")]
    [InlineData(1.0005, "1 bytes")]             // cvtstr cuts at the first ".000"
    [InlineData(27648d, "27 KiB")]
    [InlineData(2051.1684, "2.003 KiB")]
    [InlineData(1048576d, "1 MiB")]
    [InlineData(917504d, "896 KiB")]
    [InlineData(2813443.0, "2.683 MiB")]
    [InlineData(2147483648d, "2 GiB")]
    public void Sizes(double value, string expected) => QemuIoFormat.Size(value).Should().Be(expected);

    [Fact]
    public void Times()
    {
        QemuIoFormat.Time(TimeSpan.FromMilliseconds(4), false).Should().Be("00.00 sec");
        QemuIoFormat.Time(TimeSpan.FromMilliseconds(10), false).Should().Be("00.01 sec");
        QemuIoFormat.Time(TimeSpan.FromMilliseconds(10), true).Should().Be("0:00:00.01");
        QemuIoFormat.Time(TimeSpan.FromSeconds(4902.43), false).Should().Be("1:21:42.43");
    }

    [Fact]
    public void Report_lines()
    {
        var r = QemuIoFormat.Report("wrote", TimeSpan.FromMilliseconds(1), 0, 512, 512, 1, machine: false);
        r.Should().Be("wrote 512/512 bytes at offset 0\n512 bytes, 1 ops; 00.00 sec (500 KiB/sec and 1000.0000 ops/sec)\n");
        QemuIoFormat.Report("read", TimeSpan.FromSeconds(0.5), 0, 1, 1, 1, machine: true)
            .Should().Be("1,1,0:00:00.50,2.000,2.000\n");
    }

    [Fact]
    public void Hex_dump_shows_letters_and_digits_only()
    {
        var data = Enumerable.Repeat((byte)0xcd, 16).Concat("AB1 .\n"u8.ToArray()).ToArray();
        QemuIoFormat.Dump(data, 0x20).Should().Be(
            "00000020:  cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd  ................\n" +
            "00000030:  41 42 31 20 2e 0a  AB1...\n");
    }
}
