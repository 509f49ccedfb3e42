using Backup.Qmp.Commands;

namespace Backup.Qmp.Tests;

/// <summary>A handler may leave the QMP command lock once its atomic part is done; the lock is released exactly once.</summary>
public class CommandLockTests
{
    [Fact]
    public async Task Leaving_the_lock_lets_the_next_command_in_and_the_dispatcher_does_not_release_it_twice()
    {
        using var commandLock = new SemaphoreSlim(1, 1);
        await commandLock.WaitAsync();
        var context = new CommandContext(null);
        context.HoldCommandLock(commandLock);

        context.LeaveCommandLock();
        commandLock.CurrentCount.Should().Be(1, "the next command may start");
        (await commandLock.WaitAsync(0)).Should().BeTrue();

        context.LeaveCommandLock(); // what the dispatcher's finally does
        commandLock.CurrentCount.Should().Be(0, "the lock now belongs to the next command and is not released again");
    }
}
