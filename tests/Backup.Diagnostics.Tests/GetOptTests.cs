using Backup.Diagnostics.QemuIo;

namespace Backup.Diagnostics.Tests;

/// <summary>glibc getopt as qemu-io uses it; each case was checked with qemu-io 7.2's write command.</summary>
public class GetOptTests
{
    private const string WriteOpts = "bcCfnpP:qs:uz";

    private static GetOptResult Parse(string line) => GetOpt.Parse(QemuIoInterpreter.BreakLine(line), WriteOpts);

    [Fact]
    public void Attached_value()
    {
        var r = Parse("write -P0x49 512 512");
        r.Options.Should().Equal(new ParsedOption('P', "0x49"));
        r.Operands.Should().Equal("512", "512");
        r.Error.Should().BeNull();
    }

    [Fact]
    public void Separate_value_even_when_it_looks_like_an_option()
    {
        var r = Parse("write -P -1 0 1");
        r.Options.Should().Equal(new ParsedOption('P', "-1"));
        r.Operands.Should().Equal("0", "1");
    }

    [Fact]
    public void Grouped_flags_and_a_value_ending_the_group()
    {
        var r = Parse("write -qzf 0 512");
        r.Options.Select(o => o.Letter).Should().Equal('q', 'z', 'f');
        Parse("write -qP 0x11 0 1").Options.Should().Equal(new ParsedOption('q', null), new ParsedOption('P', "0x11"));
        Parse("write -Pq 0 512").Options.Should().Equal(new ParsedOption('P', "q"));
    }

    [Fact]
    public void Options_after_operands_are_options()
    {
        var r = Parse("write 0 512 -q");
        r.Options.Should().Equal(new ParsedOption('q', null));
        r.Operands.Should().Equal("0", "512");
    }

    [Fact]
    public void Double_dash_ends_options_and_a_lone_dash_is_an_operand()
    {
        Parse("write -q -- -1 1").Operands.Should().Equal("-1", "1");
        Parse("write -q 0 512 -- -q").Operands.Should().Equal("0", "512", "-q");
        Parse("write -q - 0 1").Operands.Should().Equal("-", "0", "1");
        Parse("write 0 -- 512").Operands.Should().Equal("0", "512");
    }

    [Fact]
    public void Unknown_option_and_missing_value_in_glibc_s_words()
    {
        var bad = Parse("write -q -x 0 512");
        bad.Error.Should().Be("write: invalid option -- 'x'");
        bad.Options.Should().Equal(new ParsedOption('q', null)); // what came before is still handled
        Parse("write 0 512 -P").Error.Should().Be("write: option requires an argument -- 'P'");
        Parse("write -1 0").Error.Should().Be("write: invalid option -- '1'");
        Parse("w -: 0 1").Error.Should().Be("w: invalid option -- ':'");
    }

    [Fact]
    public void Words_are_split_on_spaces_only_and_quotes_are_ordinary_characters()
    {
        QemuIoInterpreter.BreakLine("  write  -P 0x11   0 512 ").Should().Equal("write", "-P", "0x11", "0", "512");
        QemuIoInterpreter.BreakLine("write\t0 512").Should().Equal("write\t0", "512");
        QemuIoInterpreter.BreakLine("write -q 0 '512'").Should().Equal("write", "-q", "0", "'512'");
        QemuIoInterpreter.BreakLine("write -P \"1 2\" 0 1").Should().Equal("write", "-P", "\"1", "2\"", "0", "1");
    }
}
