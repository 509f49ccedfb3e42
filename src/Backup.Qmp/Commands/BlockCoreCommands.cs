using System.Text.Json.Nodes;
using Backup.Block;

namespace Backup.Qmp.Commands;

/// <summary>blockdev-add, blockdev-del, query-named-block-nodes, query-block.</summary>
public sealed class BlockCoreCommands(BlockGraph graph, IEnumerable<INodeInfoContributor> contributors) : ICommandModule
{
    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("blockdev-add", async (args, _, ct) =>
        {
            await graph.AddAsync(BlockOptionsBinder.Bind(args), ct).ConfigureAwait(false);
            return null;
        });
        table.Add("blockdev-del", async (args, _, _) =>
        {
            await graph.RemoveAsync(args["node-name"]!.GetValue<string>()).ConfigureAwait(false);
            return null;
        });
        table.Add("query-named-block-nodes", (args, _, _) =>
        {
            var flat = args["flat"]?.GetValue<bool>() ?? false;
            return ValueTask.FromResult<JsonNode?>(new JsonArray(
                graph.Nodes.Select(n => (JsonNode)NodeInfo.Describe(n, flat, contributors)).ToArray()));
        });
        table.Add("query-block", (_, _, _) => ValueTask.FromResult<JsonNode?>(new JsonArray(
            graph.RootNodes.Select(n => (JsonNode)new JsonObject
            {
                ["device"] = n.NodeName,
                ["locked"] = false,
                ["removable"] = false,
                ["inserted"] = NodeInfo.Describe(n, flat: false, contributors),
                ["type"] = "unknown",
            }).ToArray())));
    }
}
