using System.Diagnostics;
using Backup.Qmp.Session;

namespace Backup.Qmp.Tests;

public class ErrorBudgetTests
{
    [Fact]
    public async Task A_burst_within_the_budget_is_free_and_beyond_it_waits()
    {
        var budget = new ErrorBudget(perSecond: 100);
        var sw0 = Stopwatch.StartNew();
        for (var i = 0; i < 100; i++)
        {
            await budget.WaitAsync(default);
        }
        sw0.Elapsed.Should().BeLessThan(TimeSpan.FromMilliseconds(40), "the first 100 errors of a second cost nothing");
        var sw = Stopwatch.StartNew();
        for (var i = 0; i < 10; i++)
        {
            await budget.WaitAsync(default);
        }
        sw.Elapsed.Should().BeGreaterThan(TimeSpan.FromMilliseconds(50), "ten more at 100 a second take about 100 ms");
    }
}
