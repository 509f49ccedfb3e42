namespace Backup.Diagnostics.QemuIo;

/// <summary>
/// One qemu-io command as its table entry describes it (cmdinfo_t): names, argument counts checked before
/// it runs, the usage text, and whether it needs to write (QEMU then asks for the write permission first).
/// </summary>
internal sealed record QemuIoCommandInfo(
    string Name,
    string? AltName,
    int ArgMin,
    int ArgMax,
    string? Args,
    string OneLine,
    bool NeedsWrite,
    Func<QemuIoInvocation, ValueTask> Run)
{
    /// <summary>qemuio_command_usage: "name args -- oneline".</summary>
    public string Usage => $"{Name} {Args} -- {OneLine}\n";
}
