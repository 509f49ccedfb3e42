using Backup.Block.Drivers.Blkdebug;

namespace Backup.Block.Tests.Blkdebug;

/// <summary>The blkdebug state machine, as QEMU 7.2's block/blkdebug.c behaves (cross-checked with qemu-io).</summary>
public class BlkdebugRulesTests
{
    private const BlkdebugIoTypes Read = BlkdebugIoTypes.Read;

    private static InjectErrorRule Inject(BlkdebugEvent ev, int state = 0, BlkdebugIoTypes types = BlkdebugIoTypes.Default,
        int errno = 5, long sector = -1, bool once = false) =>
        new(ev, state, types, errno, sector == -1 ? -1 : sector * 512, once, immediately: false);

    private static int Check(BlkdebugRules rules, long offset = 0, long bytes = 512, BlkdebugIoTypes type = Read) =>
        rules.Check(offset, bytes, type, out _);

    [Fact]
    public async Task Chained_set_state_rules_move_one_step_per_event_and_the_rule_of_state_3_fires_on_the_third()
    {
        // qemu-io: read, read, read (fails), read with set 1->2, 2->3 and inject state 3 once, all on read_aio.
        var rules = new BlkdebugRules([
            Inject(BlkdebugEvent.ReadAio, state: 3, once: true),
            new SetStateRule(BlkdebugEvent.ReadAio, 1, 2),
            new SetStateRule(BlkdebugEvent.ReadAio, 2, 3),
        ]);
        var results = new List<int>();
        for (var i = 0; i < 4; i++)
        {
            await rules.OnEventAsync(BlkdebugEvent.ReadAio);
            results.Add(Check(rules));
        }
        results.Should().Equal(0, 0, 5, 0);
        rules.State.Should().Be(3);
    }

    [Fact]
    public async Task Rules_of_one_event_all_see_the_state_from_before_it()
    {
        var rules = new BlkdebugRules([
            new SetStateRule(BlkdebugEvent.FlushToDisk, 1, 2),
            Inject(BlkdebugEvent.FlushToDisk, state: 2),
        ]);
        await rules.OnEventAsync(BlkdebugEvent.FlushToDisk);
        rules.State.Should().Be(2);
        Check(rules).Should().Be(0, "the inject rule needed state 2 when the event fired in state 1");
        await rules.OnEventAsync(BlkdebugEvent.FlushToDisk);
        Check(rules).Should().Be(5);
    }

    [Fact]
    public async Task A_once_rule_fails_one_request_and_is_gone_even_when_its_event_fires_again()
    {
        var rules = new BlkdebugRules([Inject(BlkdebugEvent.WriteAio, errno: 28, once: true)]);
        await rules.OnEventAsync(BlkdebugEvent.WriteAio);
        Check(rules, type: BlkdebugIoTypes.Write).Should().Be(28);
        Check(rules, type: BlkdebugIoTypes.Write).Should().Be(0);
        await rules.OnEventAsync(BlkdebugEvent.WriteAio);
        Check(rules, type: BlkdebugIoTypes.Write).Should().Be(0, "QEMU removes a once rule for good");
    }

    [Fact]
    public async Task A_rule_without_once_stays_active_until_another_event_activates_other_rules()
    {
        // qemu-io: read (activates A: writes fail), write (activates B: reads fail, A dropped), ...
        var rules = new BlkdebugRules([
            Inject(BlkdebugEvent.ReadAio, types: BlkdebugIoTypes.Write, errno: 28),
            Inject(BlkdebugEvent.WriteAio, types: Read, errno: 5),
        ]);
        await rules.OnEventAsync(BlkdebugEvent.ReadAio);
        Check(rules, type: BlkdebugIoTypes.Write).Should().Be(28);
        Check(rules, type: BlkdebugIoTypes.Write).Should().Be(28);
        await rules.OnEventAsync(BlkdebugEvent.FlushToOs);
        Check(rules, type: BlkdebugIoTypes.Write).Should().Be(28, "an event without inject rules leaves the active ones");
        await rules.OnEventAsync(BlkdebugEvent.WriteAio);
        Check(rules, type: BlkdebugIoTypes.Write).Should().Be(0);
        Check(rules, type: Read).Should().Be(5);
    }

    [Fact]
    public async Task Sector_rules_match_requests_that_cover_the_sector_and_never_flushes()
    {
        var rules = new BlkdebugRules([Inject(BlkdebugEvent.None, sector: 1)]);
        await rules.OnEventAsync(BlkdebugEvent.None);
        Check(rules, 0, 512).Should().Be(0);
        Check(rules, 512, 512).Should().Be(5);
        Check(rules, 0, 4096).Should().Be(5);
        Check(rules, 1024, 4096).Should().Be(0);
        Check(rules, 0, 0, BlkdebugIoTypes.Flush).Should().Be(0);
    }

    [Fact]
    public async Task The_default_iotypes_are_all_but_block_status_and_an_iotype_restricts()
    {
        var rules = new BlkdebugRules([Inject(BlkdebugEvent.None)]);
        await rules.OnEventAsync(BlkdebugEvent.None);
        foreach (var t in new[] { BlkdebugIoTypes.Read, BlkdebugIoTypes.Write, BlkdebugIoTypes.WriteZeroes, BlkdebugIoTypes.Discard, BlkdebugIoTypes.Flush })
        {
            Check(rules, 0, t == BlkdebugIoTypes.Flush ? 0 : 512, t).Should().Be(5, t.ToString());
        }
        Check(rules, 0, 512, BlkdebugIoTypes.BlockStatus).Should().Be(0);

        var zeroes = new BlkdebugRules([Inject(BlkdebugEvent.None, types: BlkdebugIoTypes.WriteZeroes)]);
        await zeroes.OnEventAsync(BlkdebugEvent.None);
        Check(zeroes, type: BlkdebugIoTypes.Write).Should().Be(0);
        Check(zeroes, type: BlkdebugIoTypes.WriteZeroes).Should().Be(5);
    }

    [Fact]
    public async Task The_first_defined_matching_rule_decides_and_errno_0_shadows_the_rules_behind_it()
    {
        var rules = new BlkdebugRules([Inject(BlkdebugEvent.None, errno: 0, once: true), Inject(BlkdebugEvent.None, errno: 28)]);
        await rules.OnEventAsync(BlkdebugEvent.None);
        Check(rules).Should().Be(0);
        Check(rules).Should().Be(0, "the errno-0 rule is not consumed and still shadows the second");

        var ordered = new BlkdebugRules([Inject(BlkdebugEvent.None, errno: 28), Inject(BlkdebugEvent.None, errno: 5)]);
        await ordered.OnEventAsync(BlkdebugEvent.None);
        Check(ordered).Should().Be(28);
    }

    [Fact]
    public async Task A_breakpoint_suspends_the_request_until_resumed_and_is_hit_only_once()
    {
        var rules = new BlkdebugRules([]);
        rules.SetBreakpoint(BlkdebugEvent.WriteAio, "A");
        var first = rules.OnEventAsync(BlkdebugEvent.WriteAio).AsTask();
        first.IsCompleted.Should().BeFalse();
        rules.IsSuspended("A").Should().BeTrue();
        rules.IsSuspended("B").Should().BeFalse();
        rules.Resume("B").Should().BeFalse();
        rules.Resume("A").Should().BeTrue();
        await first.WaitAsync(TimeSpan.FromSeconds(5));
        rules.IsSuspended("A").Should().BeFalse();
        rules.Resume("A").Should().BeFalse("nothing is suspended any more");
        rules.OnEventAsync(BlkdebugEvent.WriteAio).AsTask().IsCompleted.Should().BeTrue("a breakpoint is removed when hit");
    }

    [Fact]
    public async Task Remove_break_resumes_what_the_tag_holds_and_drops_breakpoints_not_yet_hit()
    {
        var rules = new BlkdebugRules([]);
        rules.RemoveBreakpoint("A").Should().BeFalse();
        rules.SetBreakpoint(BlkdebugEvent.ReadAio, "A");
        rules.SetBreakpoint(BlkdebugEvent.WriteAio, "A");
        var held = rules.OnEventAsync(BlkdebugEvent.ReadAio).AsTask();
        held.IsCompleted.Should().BeFalse();
        rules.RemoveBreakpoint("A").Should().BeTrue();
        await held.WaitAsync(TimeSpan.FromSeconds(5));
        rules.OnEventAsync(BlkdebugEvent.WriteAio).AsTask().IsCompleted.Should().BeTrue();
        rules.RemoveBreakpoint("A").Should().BeFalse();
    }

    [Fact]
    public async Task A_breakpoint_and_rules_on_the_same_event_all_apply_before_the_request_waits()
    {
        var rules = new BlkdebugRules([new SetStateRule(BlkdebugEvent.WriteAio, 1, 7), Inject(BlkdebugEvent.WriteAio, state: 1)]);
        rules.SetBreakpoint(BlkdebugEvent.WriteAio, "T");
        var held = rules.OnEventAsync(BlkdebugEvent.WriteAio).AsTask();
        rules.State.Should().Be(7);
        Check(rules).Should().Be(5);
        rules.Resume("T").Should().BeTrue();
        await held.WaitAsync(TimeSpan.FromSeconds(5));
    }
}
