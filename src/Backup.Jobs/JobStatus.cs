namespace Backup.Jobs;

/// <summary>QEMU's JobStatus, in QAPI order.</summary>
public enum JobStatus
{
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

/// <summary>What a client can ask of a job (QEMU's JobVerb).</summary>
public enum JobVerb
{
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

/// <summary>QEMU's transition and verb tables, and the wire names of states and verbs.</summary>
public static class JobRules
{
    // Rows: from; columns: to. Order U C R P Y S W D X E N (as JobStatus).
    private static readonly bool[,] s_transitions = Table(
        "00000000000",
        "00100000101", // created -> running, aborting, null
        "00011010100", // running -> paused, ready, waiting, aborting
        "00100000000", // paused -> running
        "00000110100", // ready -> standby, waiting, aborting
        "00001000000", // standby -> ready
        "00000001100", // waiting -> pending, aborting
        "00000000110", // pending -> aborting, concluded
        "00000000110", // aborting -> aborting, concluded
        "00000000001", // concluded -> null
        "00000000000");

    // Rows: verb; columns: state.
    private static readonly bool[,] s_verbs = Table(
        "01111111000", // cancel
        "01111100000", // pause
        "01111100000", // resume
        "01111100000", // set-speed
        "00001000000", // complete
        "00000001000", // finalize
        "00000000010", // dismiss
        "01111100000"); // change

    public static bool CanTransition(JobStatus from, JobStatus to) => s_transitions[(int)from, (int)to];

    public static bool Allows(JobVerb verb, JobStatus status) => s_verbs[(int)verb, (int)status];

    public static string WireName(this JobStatus status) => status.ToString().ToLowerInvariant();

    public static string WireName(this JobVerb verb) => verb == JobVerb.SetSpeed ? "set-speed" : verb.ToString().ToLowerInvariant();

    private static bool[,] Table(params string[] rows)
    {
        var t = new bool[rows.Length, rows[0].Length];
        for (var r = 0; r < rows.Length; r++)
        {
            for (var c = 0; c < rows[r].Length; c++)
            {
                t[r, c] = rows[r][c] == '1';
            }
        }
        return t;
    }
}
