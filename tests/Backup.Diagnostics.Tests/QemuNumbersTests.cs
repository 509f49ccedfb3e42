using Backup.Diagnostics.QemuIo;

namespace Backup.Diagnostics.Tests;

/// <summary>Every form checked against qemu-io 7.2 (qemu-io -c "write -q 0 FORM" / "read 0 FORM").</summary>
public class QemuNumbersTests
{
    [Theory]
    [InlineData("0", 0L)]
    [InlineData("512", 512L)]
    [InlineData("+512", 512L)]
    [InlineData("017", 17L)]                    // decimal: a leading 0 is not octal here
    [InlineData("0xbb", 0xbbL)]                 // hex digits b and e are digits, never suffixes
    [InlineData("0x1b", 27L)]
    [InlineData("0x1e", 30L)]
    [InlineData("0X1B", 27L)]
    [InlineData("0x6e", 0x6eL)]
    [InlineData("0x1bk", 27L * 1024)]           // accepted, with the deprecation warning
    [InlineData("0x1bK", 27L * 1024)]
    [InlineData("1b", 1L)]
    [InlineData("1B", 1L)]
    [InlineData("1k", 1024L)]
    [InlineData("1K", 1024L)]
    [InlineData("64k", 65536L)]
    [InlineData("1M", 1L << 20)]
    [InlineData("1m", 1L << 20)]
    [InlineData("1G", 1L << 30)]
    [InlineData("1t", 1L << 40)]
    [InlineData("1p", 1L << 50)]
    [InlineData("8191p", 8191L << 50)]
    [InlineData("1e", 1L << 60)]
    [InlineData("7e", 7L << 60)]
    [InlineData("1E", 1L << 60)]
    [InlineData("1.5k", 1536L)]
    [InlineData("0.5k", 512L)]
    [InlineData("1.k", 1024L)]
    [InlineData("1.5E", 3L << 59)]
    [InlineData("0.0005k", 1L)]                 // 0.512 rounds up
    [InlineData("0.0004k", 0L)]                 // 0.4096 rounds down
    [InlineData("0.000000001k", 0L)]
    public void Accepted_forms(string text, long expected)
    {
        QemuNumbers.TryParseSize(text, out var value, out _).Should().Be(SizeError.None);
        value.Should().Be(expected);
    }

    [Theory]
    [InlineData("1.5")]                         // a fraction needs a suffix
    [InlineData("1.9999b")]
    [InlineData("0x")]
    [InlineData("0x1.5k")]                      // hex takes no fraction
    [InlineData("-1")]
    [InlineData("-0")]
    [InlineData("1e3")]                         // 1 EiB, then "3"
    [InlineData("1.5e3k")]                      // an exponent in the fraction
    [InlineData("512x")]
    [InlineData("5kb")]
    [InlineData("")]
    [InlineData("k")]
    [InlineData("\"512\"")]
    [InlineData("99999999999999999999k")]       // overflow with a suffix after it is "non-numeric"
    public void Invalid_forms(string text) =>
        QemuNumbers.TryParseSize(text, out _, out _).Should().Be(SizeError.Invalid);

    [Theory]
    [InlineData("8e")]
    [InlineData("16e")]
    [InlineData("8192p")]
    [InlineData("0xffffffffffffffff")]
    [InlineData("0x1ffffffffffffffff")]
    [InlineData("18446744073709551615")]
    [InlineData("18446744073709551616")]
    [InlineData("99999999999999999999")]
    public void Too_large_forms(string text) =>
        QemuNumbers.TryParseSize(text, out _, out _).Should().Be(SizeError.TooLarge);

    [Theory]
    [InlineData("0x1bk", true)]
    [InlineData("0x1b", false)]
    [InlineData("27k", false)]
    public void Hex_with_a_suffix_is_flagged_for_the_warning(string text, bool warned)
    {
        QemuNumbers.TryParseSize(text, out _, out var hexWithSuffix);
        hexWithSuffix.Should().Be(warned);
    }

    [Fact]
    public void Error_texts_are_qemu_io_s() =>
        new[] { QemuNumbers.ErrorText(SizeError.Invalid, "512x"), QemuNumbers.ErrorText(SizeError.TooLarge, "8e") }
            .Should().Equal("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 512x",
                "Parsing error: argument too large -- 8e");

    [Theory]
    [InlineData("0xbb", 0xbbL)]
    [InlineData("0x6e", 0x6eL)]
    [InlineData("0x49", 0x49L)]
    [InlineData("010", 8L)]                     // strtol base 0: octal
    [InlineData("255", 255L)]
    [InlineData("+7", 7L)]
    [InlineData("-0", 0L)]
    [InlineData("-1", -1L)]                     // parses; parse_pattern then refuses it
    [InlineData("99999999999999999999", long.MaxValue)]
    public void Strtol_base_0_values(string text, long expected)
    {
        QemuNumbers.TryParseLong(text, out var v).Should().BeTrue();
        v.Should().Be(expected);
    }

    [Theory]
    [InlineData("08")]
    [InlineData("0x")]
    [InlineData("1x")]
    [InlineData("q")]
    [InlineData("'")]
    [InlineData("-")]
    [InlineData("0x1g")]
    public void Strtol_refuses_trailing_text(string text) =>
        QemuNumbers.TryParseLong(text, out _).Should().BeFalse();
}
