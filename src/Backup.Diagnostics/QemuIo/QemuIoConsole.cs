namespace Backup.Diagnostics.QemuIo;

/// <summary>
/// Where qemu-io prints: QEMU's process stdout (reports, dumps, most errors) and stderr (getopt and
/// argument-count errors, unknown commands). Not the monitor: the HMP reply only carries what QEMU's
/// monitor prints (warnings, error_report).
/// </summary>
public interface IQemuIoConsole
{
    void Out(string text);

    void Error(string text);
}

/// <summary>The daemon's own stdout and stderr (backupd logs to stderr, so stdout is qemu-io's alone).</summary>
public sealed class StdioConsole : IQemuIoConsole
{
    private readonly Lock _lock = new();

    public void Out(string text) => Write(Console.Out, text);

    public void Error(string text) => Write(Console.Error, text);

    private void Write(TextWriter writer, string text)
    {
        // One command's lines stay together even when an aio request completes meanwhile.
        lock (_lock)
        {
            writer.Write(text);
            writer.Flush();
        }
    }
}
