using Backup.Block;

namespace Backup.Block.Tests;

public class QuiesceTests
{
    [Fact]
    public async Task A_quiesced_node_holds_new_requests_until_released_and_waits_for_those_inside()
    {
        var dir = Directory.CreateTempSubdirectory("bkd-quiesce");
        try
        {
            var path = Path.Combine(dir.FullName, "d.img");
            await using (var f = File.Create(path))
            {
                f.SetLength(1 << 20);
            }
            var graph = BlockGraph.CreateDefault();
            var node = await graph.AddAsync(new BlockOptions
            {
                ["driver"] = "raw",
                ["node-name"] = "d0",
                ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = path },
            });
            var held = node.QuiesceAsync();
            var gate = await held;
            node.InFlightRequests.Should().Be(0);
            var write = node.WriteAsync(0, new byte[] { 1, 2, 3 }).AsTask();
            await Task.Delay(100);
            write.IsCompleted.Should().BeFalse("the node is quiesced");
            gate.Dispose();
            await write.WaitAsync(TimeSpan.FromSeconds(10));
            var back = new byte[3];
            await node.ReadAsync(0, back);
            back.Should().Equal(1, 2, 3);
            await graph.CloseAllAsync();
        }
        finally
        {
            dir.Delete(recursive: true);
        }
    }
}
