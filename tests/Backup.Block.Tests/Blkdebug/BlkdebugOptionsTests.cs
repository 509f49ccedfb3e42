using Backup.Block.Drivers.Blkdebug;

namespace Backup.Block.Tests.Blkdebug;

/// <summary>Option checks and config files, with the texts qemu-storage-daemon 7.2 gives for the same input.</summary>
public class BlkdebugOptionsTests
{
    private static BlkdebugOptions Parse(BlockOptions o, string? config = null) =>
        BlkdebugOptions.Parse(o, _ => config ?? throw new InvalidOperationException("no config expected"));

    private static string Error(BlockOptions o, string? config = null) =>
        FluentActions.Invoking(() => Parse(o, config)).Should().Throw<BlockException>().Which.Message;

    [Theory]
    [InlineData("align", 3L, "Cannot meet constraints with align 3")]
    [InlineData("align", 2147483648L, "Cannot meet constraints with align 2147483648")]
    [InlineData("align", -1L, "Parameter 'align' expects a non-negative number below 2^64")]
    [InlineData("max-transfer", -1L, "Parameter 'max-transfer' expects a non-negative number below 2^64")]
    [InlineData("max-transfer", 2147483648L, "Parameter 'max-transfer' expects int32_t")]
    [InlineData("max-transfer", 2147483647L, "Cannot meet constraints with max-transfer 2147483647")]
    [InlineData("opt-write-zero", 2147483648L, "Parameter 'opt-write-zero' expects int32_t")]
    [InlineData("max-discard", 4294967296L, "Parameter 'max-discard' expects int32_t")]
    public void Bad_sizes_are_refused_with_QSDs_words(string key, long value, string expected) =>
        Error(new BlockOptions { [key] = value }).Should().Be(expected);

    [Fact]
    public void Limits_must_be_multiples_of_the_alignment_and_of_the_optimum()
    {
        Error(new BlockOptions { ["align"] = 512L, ["max-transfer"] = 1000L }).Should().Be("Cannot meet constraints with max-transfer 1000");
        Error(new BlockOptions { ["align"] = 8192L, ["max-transfer"] = 4096L }).Should().Be("Cannot meet constraints with max-transfer 4096");
        Error(new BlockOptions { ["opt-write-zero"] = 8192L, ["max-write-zero"] = 4096L }).Should().Be("Cannot meet constraints with max-write-zero 4096");
        Error(new BlockOptions { ["opt-discard"] = 8192L, ["max-discard"] = 4096L }).Should().Be("Cannot meet constraints with max-discard 4096");
        var ok = Parse(new BlockOptions { ["max-transfer"] = 1000L, ["opt-write-zero"] = 100L, ["align"] = 0L });
        ok.MaxTransfer.Should().Be(1000);
        ok.Align.Should().Be(1, "align 0 means the child's alignment");
    }

    [Fact]
    public void Inline_rules_take_QEMUs_defaults_and_perms_are_recorded()
    {
        var o = Parse(new BlockOptions
        {
            ["inject-error"] = new List<object?> { new BlockOptions { ["event"] = "read_aio" } },
            ["set-state"] = new List<object?> { new BlockOptions { ["event"] = "flush_to_disk", ["state"] = 1L, ["new_state"] = 2L } },
            ["take-child-perms"] = new List<object?> { "write", "resize" },
            ["unshare-child-perms"] = new List<object?> { "consistent-read" },
        });
        var inject = o.Rules.OfType<InjectErrorRule>().Single();
        (inject.Event, inject.State, inject.Errno, inject.Offset, inject.Once, inject.Immediately, inject.IoTypes)
            .Should().Be((BlkdebugEvent.ReadAio, 0, 5, -1L, false, false, BlkdebugIoTypes.Default));
        var set = o.Rules.OfType<SetStateRule>().Single();
        (set.Event, set.State, set.NewState).Should().Be((BlkdebugEvent.FlushToDisk, 1, 2));
        o.TakeChildPerms.Should().Equal("write", "resize");
        o.UnshareChildPerms.Should().Equal("consistent-read");
    }

    [Fact]
    public void A_config_file_gives_rules_before_the_inline_ones()
    {
        const string config = """
            # comment
            [inject-error]
            event = "read_aio"
            errno = "28"
            sector = "8"
            once = "on"

            [set-state]
            event = "flush_to_disk"
            state = "1"
            new_state = "2"
            """;
        var o = Parse(new BlockOptions
        {
            ["config"] = "/x/blkdebug.conf",
            ["inject-error"] = new List<object?> { new BlockOptions { ["event"] = "write_aio", ["iotype"] = "write" } },
        }, config);
        o.ConfigFile.Should().Be("/x/blkdebug.conf");
        var injects = o.Rules.OfType<InjectErrorRule>().ToList();
        injects.Select(r => r.Event).Should().Equal(BlkdebugEvent.ReadAio, BlkdebugEvent.WriteAio);
        (injects[0].Errno, injects[0].Offset, injects[0].Once).Should().Be((28, 4096L, true));
        o.Rules.OfType<SetStateRule>().Single().NewState.Should().Be(2);
    }

    [Theory]
    [InlineData("garbage here\n", "no group defined")]
    [InlineData("[inject-error]\nevent = \"bogus\"\n", "invalid parameter value: bogus")]
    [InlineData("[inject-error]\nerrno = \"5\"\n", "Missing event name for rule")]
    [InlineData("[inject-error]\nevent = \"read_aio\"\nfoo = \"1\"\n", "Invalid parameter 'foo'")]
    [InlineData("[inject-error]\nevent = \"read_aio\"\niotype = \"nope\"\n", "invalid parameter value: nope")]
    [InlineData("[other]\n", "There is no option group 'other'")]
    [InlineData("[set-state]\nevent = \"read_aio\"\nstate = \"x\"\n", "Parameter 'state' expects a number")]
    [InlineData("[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n", "Parameter 'once' expects 'on' or 'off'")]
    [InlineData("[inject-error]\n   \n", "parse error")]
    public void Bad_config_files_fail_as_QSD_does(string config, string expected) =>
        Error(new BlockOptions { ["config"] = "c" }, config).Should().Be(expected);
}
