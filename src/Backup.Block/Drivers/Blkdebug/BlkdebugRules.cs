namespace Backup.Block.Drivers.Blkdebug;

/// <summary>Request types an inject-error rule applies to (QAPI BlkdebugIOType, one bit each).</summary>
[Flags]
internal enum BlkdebugIoTypes
{
    None = 0,
    Read = 1,
    Write = 2,
    WriteZeroes = 4,
    Discard = 8,
    Flush = 16,
    BlockStatus = 32,

    /// <summary>QEMU's mask when a rule names no iotype: everything but block-status.</summary>
    Default = Read | Write | WriteZeroes | Discard | Flush,
}

/// <summary>One rule of a blkdebug node, keyed by the event that triggers it and the state it needs (0: any).</summary>
internal abstract class BlkdebugRule(BlkdebugEvent ev, int state)
{
    public BlkdebugEvent Event { get; } = ev;

    public int State { get; } = state;
}

/// <summary>
/// inject-error: once its event fires in its state, the rule is active, and fails requests of its I/O
/// types that cover its byte offset (-1: any request with a range; flushes only match -1).
/// </summary>
internal sealed class InjectErrorRule(BlkdebugEvent ev, int state, BlkdebugIoTypes ioTypes, int errno, long offset, bool once, bool immediately)
    : BlkdebugRule(ev, state)
{
    public BlkdebugIoTypes IoTypes { get; } = ioTypes;

    /// <summary>The errno returned; 0 makes an active rule that fails nothing (and shadows rules behind it), as in QEMU.</summary>
    public int Errno { get; } = errno;

    /// <summary>sector * 512, or -1 for any offset.</summary>
    public long Offset { get; } = offset;

    public bool Once { get; } = once;

    public bool Immediately { get; } = immediately;
}

/// <summary>set-state: when its event fires in its state, the node moves to <see cref="NewState"/>.</summary>
internal sealed class SetStateRule(BlkdebugEvent ev, int state, int newState) : BlkdebugRule(ev, state)
{
    public int NewState { get; } = newState;
}

/// <summary>A breakpoint (qemu-io <c>break</c>): the next request raising the event is suspended under the tag. One-shot.</summary>
internal sealed class BreakpointRule(BlkdebugEvent ev, string tag) : BlkdebugRule(ev, 0)
{
    public string Tag { get; } = tag;
}

/// <summary>
/// The rule engine of one blkdebug node: QEMU's state machine (block/blkdebug.c, behaviour only).
/// <list type="bullet">
/// <item>The state starts at 1. When an event fires, every rule of that event whose state is 0 or the
/// state <em>at the time of the event</em> is processed; set-state rules pick the new state (the last one
/// processed wins) and it takes effect after all rules ran, so one event moves the state one step.</item>
/// <item>Rules of an event are processed newest-defined first (QEMU inserts at the head of the list).</item>
/// <item>If at least one inject-error rule matches, the active list is replaced by the matching ones, in
/// definition order; otherwise it stays as it was. Active rules fail requests until another event
/// replaces them, or, with <c>once</c>, after their first failure, when they are dropped for good.</item>
/// <item>A breakpoint suspends the request that raised the event until resumed; it is removed when hit.</item>
/// </list>
/// All state is under one lock; events and checks are short, and suspension waits outside the lock.
/// </summary>
internal sealed class BlkdebugRules
{
    private readonly Lock _lock = new();
    private readonly List<BlkdebugRule>[] _byEvent;
    private readonly List<InjectErrorRule> _active = [];
    private readonly List<Suspended> _suspended = [];
    private int _state = 1;

    private sealed record Suspended(string Tag, TaskCompletionSource Resume);

    public BlkdebugRules(IEnumerable<BlkdebugRule> rules)
    {
        ArgumentNullException.ThrowIfNull(rules);
        var count = Enum.GetValues<BlkdebugEvent>().Length;
        _byEvent = new List<BlkdebugRule>[count];
        for (var i = 0; i < count; i++)
        {
            _byEvent[i] = [];
        }
        foreach (var rule in rules)
        {
            _byEvent[(int)rule.Event].Insert(0, rule);
        }
    }

    /// <summary>The current state (1 at open).</summary>
    public int State
    {
        get
        {
            lock (_lock)
            {
                return _state;
            }
        }
    }

    /// <summary>
    /// Processes the rules of <paramref name="ev"/>. Completes at once unless a breakpoint suspends the
    /// caller; then it completes when every breakpoint hit has been resumed (or removed).
    /// </summary>
    public ValueTask OnEventAsync(BlkdebugEvent ev)
    {
        List<Suspended>? hits = null;
        lock (_lock)
        {
            var rules = _byEvent[(int)ev];
            if (rules.Count == 0)
            {
                return ValueTask.CompletedTask;
            }
            var oldState = _state;
            var newState = _state;
            var injected = false;
            for (var i = 0; i < rules.Count; i++)
            {
                var rule = rules[i];
                if (rule.State != 0 && rule.State != oldState)
                {
                    continue;
                }
                switch (rule)
                {
                    case InjectErrorRule inject:
                        if (!injected)
                        {
                            _active.Clear();
                            injected = true;
                        }
                        _active.Insert(0, inject);
                        break;
                    case SetStateRule set:
                        newState = set.NewState;
                        break;
                    case BreakpointRule bp:
                        var s = new Suspended(bp.Tag, new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously));
                        _suspended.Insert(0, s);
                        (hits ??= []).Add(s);
                        rules.RemoveAt(i--);
                        break;
                }
            }
            _state = newState;
        }
        return hits is null ? ValueTask.CompletedTask : WaitAsync(hits);
    }

    private static async ValueTask WaitAsync(List<Suspended> hits)
    {
        foreach (var s in hits)
        {
            await s.Resume.Task.ConfigureAwait(false);
        }
    }

    /// <summary>
    /// The errno an active rule injects into a request of <paramref name="type"/> over
    /// [<paramref name="offset"/>, +<paramref name="bytes"/>), or 0. The first matching active rule
    /// decides; a <c>once</c> rule that fails a request is dropped from the node.
    /// </summary>
    public int Check(long offset, long bytes, BlkdebugIoTypes type, out bool immediately)
    {
        immediately = false;
        lock (_lock)
        {
            InjectErrorRule? hit = null;
            foreach (var rule in _active)
            {
                if ((rule.IoTypes & type) != 0
                    && (rule.Offset == -1 || (bytes > 0 && rule.Offset >= offset && rule.Offset - offset < bytes)))
                {
                    hit = rule;
                    break;
                }
            }
            if (hit is null || hit.Errno == 0)
            {
                return 0;
            }
            immediately = hit.Immediately;
            if (hit.Once)
            {
                _active.Remove(hit);
                _byEvent[(int)hit.Event].Remove(hit);
            }
            return hit.Errno;
        }
    }

    // ------------------------------------------------------------------ breakpoints

    public void SetBreakpoint(BlkdebugEvent ev, string tag)
    {
        ArgumentNullException.ThrowIfNull(tag);
        lock (_lock)
        {
            _byEvent[(int)ev].Insert(0, new BreakpointRule(ev, tag));
        }
    }

    /// <summary>Removes every breakpoint with the tag and resumes every request suspended under it; false when there was neither.</summary>
    public bool RemoveBreakpoint(string tag)
    {
        List<Suspended> resumed = [];
        var found = false;
        lock (_lock)
        {
            foreach (var rules in _byEvent)
            {
                found |= rules.RemoveAll(r => r is BreakpointRule bp && bp.Tag == tag) > 0;
            }
            for (var i = 0; i < _suspended.Count; i++)
            {
                if (_suspended[i].Tag == tag)
                {
                    resumed.Add(_suspended[i]);
                    _suspended.RemoveAt(i--);
                }
            }
        }
        foreach (var s in resumed)
        {
            s.Resume.TrySetResult();
        }
        return found || resumed.Count > 0;
    }

    /// <summary>Resumes the (most recently) suspended request with the tag; false when none is.</summary>
    public bool Resume(string tag)
    {
        Suspended? s;
        lock (_lock)
        {
            s = _suspended.Find(x => x.Tag == tag);
            if (s is null)
            {
                return false;
            }
            _suspended.Remove(s);
        }
        s.Resume.TrySetResult();
        return true;
    }

    public bool IsSuspended(string tag)
    {
        lock (_lock)
        {
            return _suspended.Exists(x => x.Tag == tag);
        }
    }

    /// <summary>Lets every suspended request go (the node is closing).</summary>
    public void ResumeAll()
    {
        Suspended[] all;
        lock (_lock)
        {
            all = [.. _suspended];
            _suspended.Clear();
        }
        foreach (var s in all)
        {
            s.Resume.TrySetResult();
        }
    }
}
