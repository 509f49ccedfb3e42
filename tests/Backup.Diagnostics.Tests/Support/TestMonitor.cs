using Backup.Block;
using Backup.Diagnostics.QemuIo;

namespace Backup.Diagnostics.Tests.Support;

/// <summary>human-monitor-command over a graph with one memory node "drive0", its stdout/stderr captured.</summary>
internal sealed class TestMonitor<T>(BlockGraph graph, T node) where T : MemoryNode
{
    public BlockGraph Graph { get; } = graph;
    public T Node { get; } = node;
    public CapturedConsole Console { get; } = new();
    public AioRequests Aio { get; } = new();

    private HumanMonitorCommand? _hmp;

    private HumanMonitorCommand Command => _hmp ??= new HumanMonitorCommand(Graph, new QemuIoInterpreter(Console, Aio));

    /// <summary>Runs <c>qemu-io drive0 "COMMAND"</c>; returns the HMP reply.</summary>
    public Task<string> QemuIoAsync(string command, CancellationToken ct = default) =>
        HmpAsync($"qemu-io drive0 \"{command}\"", ct);

    public async Task<string> HmpAsync(string line, CancellationToken ct = default) =>
        await Command.RunAsync(line, null, ct);
}

internal static class TestMonitor
{
    public static async Task<TestMonitor<MemoryNode>> CreateAsync(int size = 1 << 20, bool readOnly = false)
    {
        var (graph, node) = await MemoryDriver.GraphWithAsync<MemoryNode>("drive0", size, readOnly);
        return new(graph, node);
    }

    public static async Task<TestMonitor<BreakpointMemoryNode>> WithBreakpointsAsync()
    {
        var (graph, node) = await MemoryDriver.GraphWithAsync<BreakpointMemoryNode>("drive0");
        return new(graph, node);
    }

    /// <summary>stdout with the timing line's numbers masked (they are the only part that varies).</summary>
    public static string Masked(string stdout) =>
        System.Text.RegularExpressions.Regex.Replace(stdout, @"; [0-9:.]+( sec)? \([^)]*\)", "; TIME");
}
