using System.Text.Json.Nodes;
using Backup.Block;
using Backup.Block.Bitmaps;
using Backup.Qmp.Transactions;

namespace Backup.Qmp.Commands;

/// <summary>
/// The bitmap actions, each prepared (checked and applied in an undoable way), then committed or
/// aborted. Checks run in QSD's order with its texts.
/// </summary>
public sealed class BitmapActions(BlockGraph graph)
{
    public static IReadOnlyList<string> Types { get; } =
    [
        "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
    ];

    public ITransactionAction Create(string type, JsonObject data, TransactionContext context)
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(context);
        return type switch
        {
            "block-dirty-bitmap-add" => new Action(type, context, ct => AddAsync(data, ct), Discard, null, null),
            "block-dirty-bitmap-remove" => Remove(type, data, context),
            "block-dirty-bitmap-clear" => Backed(type, data, context, b => { b.Check(BitmapCheck.Default); return b.ClearWithBackup(); }),
            "block-dirty-bitmap-enable" => Toggle(type, data, context, enable: true),
            "block-dirty-bitmap-disable" => Toggle(type, data, context, enable: false),
            "block-dirty-bitmap-merge" => Merge(type, data, context),
            _ => throw new ArgumentException($"not a bitmap action: {type}", nameof(type)),
        };
    }

    /// <summary>The bitmaps of the node named by 'node'; these commands word an unknown node differently from add.</summary>
    public DirtyBitmapSet Set(JsonObject args)
    {
        ArgumentNullException.ThrowIfNull(args);
        var nodeName = args["node"]!.GetValue<string>();
        var node = graph.Find(nodeName) ?? throw new BlockException($"Node '{nodeName}' not found");
        return node.GetDirtyBitmaps();
    }

    private DirtyBitmap Get(JsonObject args) => Set(args).Get(args["name"]!.GetValue<string>());

    private async ValueTask<DirtyBitmap> AddAsync(JsonObject args, CancellationToken cancellationToken)
    {
        var bitmap = Add(args, out var crashStore);
        if (crashStore is not null)
        {
            try
            {
                // No write may be in flight between storing the bitmap and journaling it; a transaction
                // has drained the node already.
                using var drained = bitmap.Node.IsQuiesced ? null : await bitmap.Node.QuiesceAsync(cancellationToken).ConfigureAwait(false);
                await crashStore.KeepCrashConsistentAsync(bitmap, cancellationToken).ConfigureAwait(false);
            }
            catch
            {
                bitmap.Owner.Release(bitmap);
                throw;
            }
        }
        return bitmap;
    }

    /// <summary>
    /// Undoes an add. A crash-consistent bitmap stays journaled until the node closes: its stored entry
    /// is trusted after a crash until then, so it must keep covering every write. The next clean close
    /// drops it, like any stored bitmap the node no longer has.
    /// </summary>
    private static void Discard(DirtyBitmap bitmap) => bitmap.Owner.Release(bitmap);

    private DirtyBitmap Add(JsonObject args, out ICrashConsistentBitmapStore? crashStore)
    {
        crashStore = null;
        var name = args["name"]!.GetValue<string>();
        DirtyBitmapSet.CheckNameNotEmpty(name);
        var nodeName = args["node"]!.GetValue<string>();
        var node = graph.Get(nodeName);
        var granularity = args["granularity"]?.GetValue<long>();
        if (granularity is { } g)
        {
            DirtyBitmapSet.CheckGranularity(g);
        }
        var persistent = args["persistent"]?.GetValue<bool>() ?? false;
        if (persistent)
        {
            CheckCanStore(node, name, granularity ?? DirtyBitmapSet.DefaultGranularity(node));
        }
        if (args["crash-consistent"]?.GetValue<bool>() ?? false)
        {
            if (!persistent)
            {
                throw new BlockException($"Bitmap '{name}' must be persistent to be crash-consistent");
            }
            crashStore = node as ICrashConsistentBitmapStore ?? throw new BlockException(
                $"Can't make bitmap '{name}' crash-consistent in '{node.NodeName}': Operation not supported");
            crashStore.CheckCanKeepCrashConsistent(name);
        }
        return node.GetDirtyBitmaps().Add(name, granularity, persistent, args["disabled"]?.GetValue<bool>() ?? false);
    }

    /// <summary>
    /// QEMU asks the format whether it can store a new persistent bitmap before creating it: only
    /// qcow2 can (its bitmaps extension, with its limits on names, sizes and counts).
    /// </summary>
    private static void CheckCanStore(BlockNode node, string name, long granularity)
    {
        if (node is not IPersistentBitmapStore store)
        {
            throw new BlockException($"Can't store persistent bitmaps to {node.NodeName}: Operation not supported");
        }
        store.CheckCanStoreNew(name, granularity);
    }

    /// <summary>
    /// Remove: prepare checks, marks the bitmap busy (so nothing else takes it) and deletes a stored
    /// bitmap from the image at once, as QEMU does (an abort keeps the bitmap, which is stored again at
    /// close); commit drops it from the node.
    /// </summary>
    private Action Remove(string type, JsonObject data, TransactionContext context) => new(type, context,
        async ct =>
        {
            var set = Set(data);
            var b = set.Get(data["name"]!.GetValue<string>());
            b.Check(BitmapCheck.Busy | BitmapCheck.ReadOnly);
            b.SetBusy(true);
            try
            {
                if (b.Persistent && set.Node is IPersistentBitmapStore store)
                {
                    await store.RemoveStoredAsync(b.Name!, ct).ConfigureAwait(false);
                }
            }
            catch
            {
                b.SetBusy(false);
                throw;
            }
            return b;
        },
        b => b.SetBusy(false),
        b =>
        {
            b.SetBusy(false);
            b.Owner.Remove(b.Name!);
        },
        null);

    private Action Toggle(string type, JsonObject data, TransactionContext context, bool enable)
    {
        var wasEnabled = false;
        return new Action(type, context,
            Sync(() =>
            {
                var b = Get(data);
                b.Check(BitmapCheck.AllowReadOnly);
                wasEnabled = b.Enabled;
                if (enable)
                {
                    b.Enable();
                }
                else
                {
                    b.Disable();
                }
                return b;
            }),
            b =>
            {
                if (wasEnabled)
                {
                    b.Enable();
                }
                else
                {
                    b.Disable();
                }
            },
            null, null);
    }

    /// <summary>Clear and merge change the bits at prepare and keep a backup that abort restores.</summary>
    private Action Backed(string type, JsonObject data, TransactionContext context, Func<DirtyBitmap, DirtyBitmapBackup> apply)
    {
        DirtyBitmapBackup? backup = null;
        return new Action(type, context,
            Sync(() =>
            {
                var b = Get(data);
                backup = apply(b);
                return b;
            }),
            _ => backup?.Restore(),
            null,
            () => backup?.Dispose());
    }

    private Action Merge(string type, JsonObject data, TransactionContext context)
    {
        DirtyBitmapBackup? backup = null;
        return new Action(type, context,
            async ct =>
            {
                var set = Set(data);
                var target = set.Get(data["target"]!.GetValue<string>());
                var sources = new List<DirtyBitmap>();
                foreach (var s in data["bitmaps"]!.AsArray())
                {
                    sources.Add(s is JsonObject external ? Get(external) : set.Get(s!.GetValue<string>()));
                }
                backup = DirtyBitmapSet.Merge(target, sources, withBackup: true);
                if (target.CrashTracker is { } tracker)
                {
                    // Merged bits never passed the write path: journal them before the merge counts.
                    // Aborting leaves them on disk, which only over-approximates.
                    await tracker.PersistBitsAsync(ct).ConfigureAwait(false);
                }
                return target;
            },
            _ => backup?.Restore(),
            null,
            () => backup?.Dispose());
    }

    private static Func<CancellationToken, ValueTask<DirtyBitmap>> Sync(Func<DirtyBitmap> prepare) =>
        _ => ValueTask.FromResult(prepare());

    /// <summary>An action from its four steps; the prepared bitmap is handed to abort and commit.</summary>
    private sealed class Action(
        string type,
        TransactionContext context,
        Func<CancellationToken, ValueTask<DirtyBitmap>> prepare,
        System.Action<DirtyBitmap>? abort,
        System.Action<DirtyBitmap>? commit,
        System.Action? clean) : ITransactionAction
    {
        private DirtyBitmap? _bitmap;

        public async ValueTask PrepareAsync(CancellationToken cancellationToken)
        {
            context.RequireIndividual(type);
            _bitmap = await prepare(cancellationToken).ConfigureAwait(false);
        }

        public void Commit()
        {
            if (_bitmap is not null)
            {
                commit?.Invoke(_bitmap);
            }
        }

        public void Abort()
        {
            if (_bitmap is not null)
            {
                abort?.Invoke(_bitmap);
            }
        }

        public void Clean() => clean?.Invoke();
    }
}
