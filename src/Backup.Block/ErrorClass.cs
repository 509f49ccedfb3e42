namespace Backup.Block;

/// <summary>
/// The closed set of error classes a client can see (QEMU's QapiErrorClass). Almost everything is
/// <see cref="GenericError"/>; the others exist because QEMU clients test for them.
/// </summary>
public enum ErrorClass
{
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

/// <summary>
/// A user-facing failure: the message is the one qemu-storage-daemon gives for the same mistake,
/// so that scripts written against QSD keep working.
/// </summary>
public class BlockException : Exception
{
    public BlockException(string message, ErrorClass errorClass = ErrorClass.GenericError)
        : base(message) => ErrorClass = errorClass;

    public BlockException(string message, Exception innerException)
        : base(message, innerException) => ErrorClass = ErrorClass.GenericError;

    public BlockException() : this("Unknown error") { }

    public BlockException(string message) : this(message, ErrorClass.GenericError) { }

    public ErrorClass ErrorClass { get; }

    /// <summary>
    /// A second line a command-line tool prints under the message and QMP leaves out (QEMU's
    /// error_append_hint), e.g. "Is another process using the image [disk.qcow2]?".
    /// </summary>
    public virtual string? Hint => null;
}
