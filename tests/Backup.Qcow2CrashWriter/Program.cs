using Backup.Block;
using Backup.Qcow2CrashWriter;

// Usage: Backup.Qcow2CrashWriter <image.qcow2> <seed>
// Opens the image read-write through the qcow2 driver and issues the workload forever, printing
// "ACK <n>" after request n completed. The test kills it with SIGKILL at some point.
if (args.Length != 2)
{
    await Console.Error.WriteLineAsync("usage: Backup.Qcow2CrashWriter <image.qcow2> <seed>");
    return 2;
}
var graph = BlockGraph.CreateDefault();
var node = await graph.AddAsync(new BlockOptions
{
    ["driver"] = "qcow2",
    ["node-name"] = "img",
    ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = args[0] },
});
var stdout = Console.Out;
var n = 0;
foreach (var op in CrashWorkload.Ops(int.Parse(args[1], System.Globalization.CultureInfo.InvariantCulture), node.Length))
{
    switch (op.Kind)
    {
        case CrashWorkload.Kind.Write:
            await node.WriteAsync(op.Offset, CrashWorkload.Data(op));
            break;
        case CrashWorkload.Kind.WriteZeroes:
            await node.WriteZeroesAsync(op.Offset, op.Length, WriteFlags.MayUnmap);
            break;
        default:
            await node.FlushAsync();
            break;
    }
    await stdout.WriteLineAsync($"ACK {n++}");
    await stdout.FlushAsync();
}
return 0;
