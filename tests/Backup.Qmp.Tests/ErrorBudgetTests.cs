using System.Diagnostics;
using Backup.Qmp.Session;

namespace Backup.Qmp.Tests;

public class ErrorBudgetTests
{
    [Fact]
    public async Task A_burst_within_the_budget_is_free_and_beyond_it_waits()
    {
        var budget = new ErrorBudget(perSecond: 100);
        for (var i = 0; i < 100; i++)
        {
            budget.WaitAsync(default).IsCompleted.Should().BeTrue("the first {0} errors of a second cost nothing", 100);
        }
        var sw = Stopwatch.StartNew();
        for (var i = 0; i < 10; i++)
        {
            await budget.WaitAsync(default);
        }
        sw.Elapsed.Should().BeGreaterThan(TimeSpan.FromMilliseconds(50), "ten more at 100 a second take about 100 ms");
    }
}
