using Backup.Block;

namespace Backup.Diagnostics.QemuIo.Commands;

/// <summary>
/// break, remove_break, resume, wait_break: blkdebug breakpoints on the first node down the primary-child
/// path that takes them (QEMU's bdrv_debug_*); without one, ENOTSUP.
/// </summary>
internal static class DebugCommands
{
    /// <summary>How often wait_break looks (QEMU polls its event loop; a request pauses within this much).</summary>
    private static readonly TimeSpan PollInterval = TimeSpan.FromMilliseconds(1);

    public static IEnumerable<QemuIoCommandInfo> All =>
    [
        new("break", null, 2, 2, "event tag", "sets a breakpoint on event and tags the stopped request as tag", NeedsWrite: false, Break),
        new("remove_break", null, 1, 1, "tag", "remove a breakpoint by tag", NeedsWrite: false, RemoveBreak),
        new("resume", null, 1, 1, "tag", "resumes the request tagged as tag", NeedsWrite: false, Resume),
        new("wait_break", null, 1, 1, "tag", "waits for the suspension of a request", NeedsWrite: false, WaitBreakAsync),
    ];

    private static ValueTask Break(QemuIoInvocation io)
    {
        var errno = io.Node.FindDebugBreakpoints() is not { } bp ? Errno.ENOTSUP
            : !BlkdebugEventNames.TryParse(io.Argv[1], out var ev) ? Errno.ENOENT
            : Set(bp, ev, io.Argv[2]);
        if (errno != 0)
        {
            io.Print($"Could not set breakpoint: {Errno.Describe(errno)}\n");
        }
        return ValueTask.CompletedTask;

        static int Set(IDebugBreakpoints bp, BlkdebugEvent ev, string tag)
        {
            bp.SetBreakpoint(ev, tag);
            return 0;
        }
    }

    private static ValueTask RemoveBreak(QemuIoInvocation io)
    {
        var tag = io.Argv[1];
        var errno = io.Node.FindDebugBreakpoints() is not { } bp ? Errno.ENOTSUP
            : bp.RemoveBreakpoint(tag) ? 0 : Errno.ENOENT;
        if (errno != 0)
        {
            io.Print($"Could not remove breakpoint {tag}: {Errno.Describe(errno)}\n");
        }
        return ValueTask.CompletedTask;
    }

    private static ValueTask Resume(QemuIoInvocation io)
    {
        var errno = io.Node.FindDebugBreakpoints() is not { } bp ? Errno.ENOTSUP
            : bp.Resume(io.Argv[1]) ? 0 : Errno.ENOENT;
        if (errno != 0)
        {
            io.Print($"Could not resume request: {Errno.Describe(errno)}\n");
        }
        return ValueTask.CompletedTask;
    }

    /// <summary>Polls until a request is paused under the tag. As in QEMU, without blkdebug it waits for ever (until the client goes).</summary>
    private static async ValueTask WaitBreakAsync(QemuIoInvocation io)
    {
        var bp = io.Node.FindDebugBreakpoints();
        var tag = io.Argv[1];
        while (bp is null || !bp.IsSuspended(tag))
        {
            await Task.Delay(PollInterval, io.CancellationToken).ConfigureAwait(false);
        }
    }
}
