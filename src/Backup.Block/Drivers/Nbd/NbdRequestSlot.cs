using System.Threading.Tasks.Sources;

namespace Backup.Block.Drivers.Nbd;

/// <summary>How one request ended, as the reply reader saw it.</summary>
public readonly record struct NbdReply(NbdReplyOutcome Outcome, uint Error, uint ExtentLength, uint ExtentFlags)
{
    public static NbdReply Lost { get; } = new(NbdReplyOutcome.ConnectionLost, 0, 0, 0);
}

public enum NbdReplyOutcome
{
    /// <summary>The server answered; <see cref="NbdReply.Error"/> is its NBD error (0: success).</summary>
    Replied,
    /// <summary>The connection ended before the reply was complete; the request may be retried on a new one.</summary>
    ConnectionLost,
}

/// <summary>
/// One entry of the request table: what was asked (so the reader can check and place the reply) and the
/// completion the requester awaits. Slots are reused: the completion is a ManualResetValueTaskSourceCore,
/// the header buffer is the slot's own, so a request allocates nothing.
/// </summary>
internal sealed class NbdRequestSlot : IValueTaskSource<NbdReply>
{
    private ManualResetValueTaskSourceCore<NbdReply> _core = new() { RunContinuationsAsynchronously = true };
    private int _completed;

    public NbdRequestSlot(int index) => Index = index;

    public int Index { get; }

    /// <summary>Bumped at every use: the high half of the cookie, so a reply to an old use is caught.</summary>
    public uint Generation { get; private set; }

    public bool InUse { get; private set; }

    public ushort Type { get; private set; }

    public ulong Offset { get; private set; }

    public uint Length { get; private set; }

    public Memory<byte> ReadBuffer { get; private set; }

    /// <summary>Header bytes of the request frame (written under the send lock).</summary>
    public byte[] Header { get; } = new byte[Backup.Nbd.Protocol.NbdRequest.Size];

    // What the reader gathered from structured chunks so far.
    public uint Error { get; set; }

    public long Covered { get; set; }

    public bool HasExtent { get; set; }

    public uint ExtentLength { get; set; }

    public uint ExtentFlags { get; set; }

    public ulong Cookie => ((ulong)Generation << 32) | (uint)Index;

    public void Begin(ushort type, ulong offset, uint length, Memory<byte> readBuffer)
    {
        Generation++;
        InUse = true;
        Type = type;
        Offset = offset;
        Length = length;
        ReadBuffer = readBuffer;
        Error = 0;
        Covered = 0;
        HasExtent = false;
        ExtentLength = 0;
        ExtentFlags = 0;
        _completed = 0;
        _core.Reset();
    }

    public ValueTask<NbdReply> Task => new(this, _core.Version);

    /// <summary>Completes the request once; false if it was already complete.</summary>
    public bool Complete(NbdReply reply)
    {
        if (Interlocked.Exchange(ref _completed, 1) != 0)
        {
            return false;
        }
        _core.SetResult(reply);
        return true;
    }

    public bool IsCompleted => Volatile.Read(ref _completed) != 0;

    public void End()
    {
        InUse = false;
        ReadBuffer = default;
    }

    NbdReply IValueTaskSource<NbdReply>.GetResult(short token) => _core.GetResult(token);

    ValueTaskSourceStatus IValueTaskSource<NbdReply>.GetStatus(short token) => _core.GetStatus(token);

    void IValueTaskSource<NbdReply>.OnCompleted(Action<object?> continuation, object? state, short token,
        ValueTaskSourceOnCompletedFlags flags) => _core.OnCompleted(continuation, state, token, flags);
}
