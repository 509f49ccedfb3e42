namespace Backup.Ctl;

/// <summary>What backupctl's exit status means (docs/backupctl.md lists them too).</summary>
public static class ExitCodes
{
    /// <summary>Done.</summary>
    public const int Ok = 0;

    /// <summary>The operation failed: the daemon refused a command, a job failed, verify found a difference.</summary>
    public const int Failed = 1;

    /// <summary>The command line is wrong (unknown option, missing argument, bad value).</summary>
    public const int Usage = 2;

    /// <summary>No QMP server could be reached at the address (or it is not a QMP server).</summary>
    public const int CannotConnect = 3;
}

/// <summary>
/// A failure to report to the user: one message, an exit code, and optional facts for <c>--json</c>.
/// </summary>
public sealed class CtlException : Exception
{
    public CtlException(string message, int exitCode = ExitCodes.Failed, System.Text.Json.Nodes.JsonObject? details = null)
        : base(message)
    {
        ExitCode = exitCode;
        Details = details;
    }

    public CtlException() : this("failed") { }

    public CtlException(string message) : this(message, ExitCodes.Failed) { }

    public CtlException(string message, Exception innerException) : base(message, innerException) => ExitCode = ExitCodes.Failed;

    public int ExitCode { get; }

    /// <summary>More about the failure, merged into the <c>--json</c> result.</summary>
    public System.Text.Json.Nodes.JsonObject? Details { get; }
}
