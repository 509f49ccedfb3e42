using Backup.Qmp.Session;

namespace Backup.Qmp.Tests;

public class ErrorBudgetTests
{
    private sealed class ManualTime : TimeProvider
    {
        public long Now { get; set; }

        public override long GetTimestamp() => Now;

        public override long TimestampFrequency => 1_000_000;
    }

    [Fact]
    public void A_burst_within_the_budget_is_free_beyond_it_waits_and_the_budget_refills_with_time()
    {
        var time = new ManualTime();
        var budget = new ErrorBudget(perSecond: 100, time);
        for (var i = 0; i < 100; i++)
        {
            budget.Take().Should().Be(TimeSpan.Zero, "the first 100 errors of a second cost nothing");
        }
        budget.Take().Should().Be(TimeSpan.FromMilliseconds(10), "one more at 100 a second waits 10 ms");
        budget.Take().Should().Be(TimeSpan.FromMilliseconds(20));
        time.Now += 1_000_000; // one second later
        budget.Take().Should().Be(TimeSpan.Zero);
    }
}
