namespace Backup.Qmp.Client;

/// <summary>
/// The server answered a command with <c>{"error": {"class": ..., "desc": ...}}</c>. <see cref="Desc"/> is
/// the server's text for humans; <see cref="Class"/> is the one to branch on (GenericError,
/// CommandNotFound, DeviceNotFound, ...).
/// </summary>
public sealed class QmpErrorException : Exception
{
    public QmpErrorException(string command, string errorClass, string desc)
        : base($"{command}: {desc}")
    {
        Command = command;
        Class = errorClass;
        Desc = desc;
    }

    public QmpErrorException() : this("", "GenericError", "") { }

    public QmpErrorException(string message) : this("", "GenericError", message) { }

    public QmpErrorException(string message, Exception innerException) : base(message, innerException)
    {
        Command = "";
        Class = "GenericError";
        Desc = message;
    }

    /// <summary>The command that failed.</summary>
    public string Command { get; }

    /// <summary>QMP's error class, e.g. "GenericError".</summary>
    public string Class { get; }

    /// <summary>The server's description.</summary>
    public string Desc { get; }
}

/// <summary>
/// The connection failed or broke: no server at the address, a peer that is not a QMP server, or a
/// connection closed with commands still waiting for their replies.
/// </summary>
public sealed class QmpConnectionException : Exception
{
    public QmpConnectionException() : base("QMP connection failed") { }

    public QmpConnectionException(string message) : base(message) { }

    public QmpConnectionException(string message, Exception innerException) : base(message, innerException) { }
}
