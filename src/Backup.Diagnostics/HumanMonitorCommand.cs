using System.Text;
using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Diagnostics.Hmp;
using Backup.Diagnostics.QemuIo;
using Backup.Qmp.Commands;

namespace Backup.Diagnostics;

/// <summary>
/// human-monitor-command, whose monitor knows one command: <c>qemu-io [-d] NODE "COMMAND"</c>, for
/// iotest-style suites. The reply is what QEMU's monitor prints ("" when qemu-io ran, whatever it
/// printed: qemu-io writes on the daemon's stdout and stderr). The node is looked up under the QMP
/// command lock and held (it cannot be deleted) while the command runs outside that lock, so a long
/// or blocked request (sleep, wait_break, a large write) does not stop other clients' commands.
/// </summary>
public sealed class HumanMonitorCommand(BlockGraph graph, QemuIoInterpreter interpreter) : ICommandModule
{
    private const string UserReason = "node is used by a qemu-io command";

    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("human-monitor-command", async (args, context, ct) =>
            JsonValue.Create(await RunAsync(args["command-line"]!.GetValue<string>(), context, ct).ConfigureAwait(false)));
    }

    /// <summary>Runs one monitor line; returns the monitor's reply text (lines end in "\r\n", as QEMU's).</summary>
    public async ValueTask<string> RunAsync(string commandLine, CommandContext? context, CancellationToken cancellationToken)
    {
        var line = HmpQemuIoParser.Parse(commandLine);
        if (line.Stdout.Length > 0)
        {
            interpreter.Console.Out(line.Stdout);
        }
        if (line.Reply is { } refused)
        {
            return ToMonitor(refused);
        }
        if (line.Qdev)
        {
            // -d names a guest device; backupd, like QSD, has none.
            return ToMonitor($"Error: Device '{line.Device}' not found\n");
        }
        var node = graph.Find(line.Device);
        if (node is null)
        {
            return ToMonitor($"Error: Cannot find device='' nor node-name='{line.Device}'\n");
        }
        var monitor = new StringBuilder();
        using (node.AddUser(UserReason))
        {
            context?.LeaveCommandLock();
            await interpreter.RunAsync(node, line.Command, monitor, cancellationToken).ConfigureAwait(false);
        }
        return ToMonitor(monitor.ToString());
    }

    private static string ToMonitor(string text) => text.Replace("\n", "\r\n", StringComparison.Ordinal);
}
