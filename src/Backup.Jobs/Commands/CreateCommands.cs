using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Drivers.File;
using Backup.Block.Drivers.Qcow2;
using Backup.Jobs.Create;
using Backup.Qmp.Commands;

namespace Backup.Jobs.Commands;

/// <summary>blockdev-create (schemas/create.json): binds BlockdevCreateOptions and starts a <see cref="CreateJob"/>.</summary>
public sealed class CreateCommands(JobManager jobs, BlockGraph graph) : ICommandModule
{
    public void Register(CommandTable table)
    {
        ArgumentNullException.ThrowIfNull(table);
        table.Add("blockdev-create", (a, _, _) =>
        {
            var id = a["job-id"]!.GetValue<string>();
            // As in QEMU, the driver is checked before the job id; everything else fails in the job.
            var creation = Bind(graph, (JsonObject)a["options"]!);
            jobs.CheckNewId(id);
            jobs.Start(new CreateJob(jobs, id, creation));
            return ValueTask.FromResult<JsonNode?>(null);
        });
    }

    /// <summary>BlockdevCreateOptions (validated by the schema) → what the job does.</summary>
    public static ImageCreation Bind(BlockGraph graph, JsonObject o)
    {
        ArgumentNullException.ThrowIfNull(o);
        var prealloc = Str(o, "preallocation");
        switch (o["driver"]!.GetValue<string>())
        {
            case "file":
                return new FileCreation(new FileCreateOptions(o["filename"]!.GetValue<string>(), Int64(o["size"]!), prealloc switch
                {
                    "falloc" => Preallocation.Falloc,
                    "full" => Preallocation.Full,
                    "metadata" => Preallocation.Metadata,
                    _ => Preallocation.Off,
                }));
            case "qcow2" when prealloc is "falloc" or "full":
                // These also reserve the data clusters' blocks; not implemented for qcow2 (off and metadata are).
                return new FailedCreation($"Unsupported preallocation mode: {prealloc}");
            case "qcow2":
                return new Qcow2Creation(graph, Ref(o["file"]!), o["data-file"] is { } d ? Ref(d) : null, new Qcow2CreateOptions
                {
                    Size = Int64(o["size"]!),
                    Version = Str(o, "version") == "v2" ? Qcow2Version.V2 : Qcow2Version.V3,
                    ClusterSize = o["cluster-size"] is { } cs ? (int)Math.Clamp(Int64(cs), int.MinValue, int.MaxValue) : 65536,
                    BackingFile = Str(o, "backing-file"),
                    BackingFormat = Str(o, "backing-fmt"),
                    Preallocation = prealloc == "metadata" ? Qcow2Preallocation.Metadata : Qcow2Preallocation.Off,
                    LazyRefcounts = o["lazy-refcounts"]?.GetValue<bool>() ?? false,
                    RefcountBits = (int)Math.Clamp(o["refcount-bits"]?.GetValue<long>() ?? 16, int.MinValue, int.MaxValue),
                    DataFileRaw = o["data-file-raw"]?.GetValue<bool>() ?? false,
                });
            default:
                // The schema has no branch for the other drivers (raw, blkdebug), as QEMU has none.
                throw new BlockException("Driver does not support blockdev-create");
        }
    }

    private static BlockRef Ref(JsonNode node) => node is JsonObject def
        ? new BlockRef(null, BlockOptionsBinder.Bind(def))
        : new BlockRef(node.GetValue<string>(), null);

    /// <summary>A 'size' as QEMU reads it: JSON integers past 2^63 wrap to negative values (-1 arrives as 2^64-1).</summary>
    private static long Int64(JsonNode node) =>
        node.AsValue().TryGetValue<long>(out var l) ? l : unchecked((long)node.GetValue<ulong>());

    private static string? Str(JsonObject a, string key) => a[key]?.GetValue<string>();
}
