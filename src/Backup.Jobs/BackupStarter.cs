using Backup.Block;
using Backup.Block.Bitmaps;
using Backup.Block.Copy;
using Backup.Block.Drivers.CopyBeforeWrite;
using Backup.Block.Drivers.Qcow2;

namespace Backup.Jobs;

/// <summary>The arguments of blockdev-backup / drive-backup (QAPI BackupCommon plus the target), as given.</summary>
public sealed record BackupRequest
{
    public string? JobId { get; init; }
    public required string Device { get; init; }
    /// <summary>MirrorSyncMode wire name: full, top, none, incremental, bitmap, differential.</summary>
    public required string Sync { get; init; }
    public long? Speed { get; init; }
    public string? Bitmap { get; init; }
    /// <summary>BitmapSyncMode wire name: on-success, never, always.</summary>
    public string? BitmapMode { get; init; }
    public bool Compress { get; init; }
    /// <summary>Discard what the job copied on the source (upstream QEMU's discard-source).</summary>
    public bool DiscardSource { get; init; }

    /// <summary>The job filter's on-cbw-error (a backupd extension); null for QEMU's break-guest-write.</summary>
    public string? OnCbwError { get; init; }
    public string? OnSourceError { get; init; }
    public string? OnTargetError { get; init; }
    public bool AutoFinalize { get; init; } = true;
    public bool AutoDismiss { get; init; } = true;
    public long? MaxWorkers { get; init; }
    public long? MaxChunk { get; init; }
    public ulong? MinClusterSize { get; init; }
    /// <summary>Name of the copy-before-write filter node the job puts above the source; generated when null.</summary>
    public string? FilterNodeName { get; init; }
    /// <summary>x-perf use-copy-range (accepted; see BackupJob for why copies are read + write).</summary>
    public bool UseCopyRange { get; init; }
    /// <summary>blockdev-backup: the target node.</summary>
    public string? Target { get; init; }
    /// <summary>drive-backup: the target file, its format and mode (existing, absolute-paths).</summary>
    public string? TargetFile { get; init; }
    public string? Format { get; init; }
    public string? Mode { get; init; }
}

/// <summary>
/// Checks backup arguments in QSD's order with its messages (blockdev.c do_backup_common, backup.c
/// backup_job_create, job.c job_create) and starts the job.
/// </summary>
public sealed class BackupStarter(BlockGraph graph, JobManager jobs)
{
    /// <summary>blockdev-backup.</summary>
    public BackupJob StartBlockdevBackup(BackupRequest request)
    {
        var job = PrepareBlockdevBackup(request);
        jobs.Start(job);
        return job;
    }

    /// <summary>
    /// blockdev-backup up to its point in time: checked, bitmap frozen, copy-before-write in place, but
    /// not registered or running (a transaction registers it at prepare and runs it at commit).
    /// </summary>
    public BackupJob PrepareBlockdevBackup(BackupRequest request)
    {
        ArgumentNullException.ThrowIfNull(request);
        var source = graph.Get(request.Device);
        var target = graph.Get(request.Target!);
        return Prepare(request, source, target, null);
    }

    /// <summary>drive-backup: opens (mode existing) or creates (absolute-paths) the target image first.</summary>
    public async Task<BackupJob> StartDriveBackupAsync(BackupRequest request, CancellationToken cancellationToken)
    {
        var job = await PrepareDriveBackupAsync(request, cancellationToken).ConfigureAwait(false);
        jobs.Start(job);
        return job;
    }

    /// <summary>drive-backup up to its point in time (see <see cref="PrepareBlockdevBackup"/>).</summary>
    public async Task<BackupJob> PrepareDriveBackupAsync(BackupRequest request, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(request);
        var source = graph.Get(request.Device);
        var mode = request.Mode ?? "absolute-paths";
        var path = request.TargetFile!;
        var format = request.Format ?? (mode == "existing" ? null : source.DriverName);
        var sync = request.Sync;
        BlockNode? backing = null;
        if (sync == "top")
        {
            backing = BackingOf(source);
            if (backing is null)
            {
                sync = "full";
            }
        }
        if (sync == "none")
        {
            backing = source;
        }
        if (Qmp.Commands.JsonFilename.IsJson(path))
        {
            return await PrepareJsonTargetAsync(request with { Sync = sync }, source, mode, path, request.Format, backing, cancellationToken).ConfigureAwait(false);
        }
        // An nbd: or nbd+unix:// name selects the nbd protocol, as QEMU picks a protocol by a file name's prefix.
        var remote = Block.Drivers.Nbd.NbdFilename.IsNbd(path);
        Func<BlockOptions> protocol = remote
            ? () => Block.Drivers.Nbd.NbdFilename.Parse(path)
            : () => new BlockOptions { ["driver"] = "file", ["filename"] = path };
        if (mode != "existing")
        {
            if (remote)
            {
                await FormatRemoteAsync(protocol(), format!, source.Length, sync == "none" ? null : backing, cancellationToken).ConfigureAwait(false);
            }
            else
            {
                await CreateImageAsync(path, format!, source.Length, sync == "none" ? null : backing, cancellationToken).ConfigureAwait(false);
            }
        }
        if (format is null)
        {
            format = remote ? await ProbeNodeAsync(protocol(), cancellationToken).ConfigureAwait(false) : await ProbeAsync(path).ConfigureAwait(false);
        }
        var options = new BlockOptions
        {
            ["driver"] = format,
            ["file"] = protocol(),
        };
        if (sync == "none")
        {
            options["backing"] = source.NodeName;
        }
        var target = await graph.OpenOwnedAsync(options, cancellationToken).ConfigureAwait(false);
        try
        {
            return Prepare(request with { Sync = sync }, source, target, () => graph.ReleaseAsync(target));
        }
        catch
        {
            await graph.ReleaseAsync(target).ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>
    /// drive-backup to a <c>json:{…}</c> target: the object is the whole target node (e.g. an nbd node, or
    /// qcow2 over one). As in QEMU it names an existing image only: image creation does not know the
    /// pseudo-protocol ("Unknown protocol 'json'").
    /// </summary>
    private async Task<BackupJob> PrepareJsonTargetAsync(BackupRequest request, BlockNode source, string mode, string path, string? format,
        BlockNode? backing, CancellationToken cancellationToken)
    {
        if (mode != "existing")
        {
            throw new BlockException("Unknown protocol 'json'");
        }
        var options = Qmp.Commands.JsonFilename.Parse(path, format);
        if (request.Sync == "none")
        {
            options["backing"] = backing!.NodeName;
        }
        var target = await graph.OpenOwnedAsync(options, cancellationToken).ConfigureAwait(false);
        try
        {
            return Prepare(request, source, target, () => graph.ReleaseAsync(target));
        }
        catch
        {
            await graph.ReleaseAsync(target).ConfigureAwait(false);
            throw;
        }
    }

    private BackupJob Prepare(BackupRequest r, BlockNode source, BlockNode target, Func<ValueTask>? release)
    {
        var sync = r.Sync;
        var hasMode = r.BitmapMode is not null;
        var mode = ParseMode(r.BitmapMode);
        if (sync is "bitmap" or "incremental" or "differential" && r.Bitmap is null)
        {
            throw new BlockException($"must provide a valid bitmap name for '{sync}' sync mode");
        }
        if (sync == "incremental")
        {
            if (hasMode && mode != BitmapSyncMode.OnSuccess)
            {
                throw new BlockException("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
            }
            (hasMode, mode, sync) = (true, BitmapSyncMode.OnSuccess, "bitmap");
        }
        if (sync == "differential")
        {
            if (hasMode && mode != BitmapSyncMode.Never)
            {
                throw new BlockException("Bitmap sync mode must be 'never' when using sync mode 'differential'");
            }
            (hasMode, mode, sync) = (true, BitmapSyncMode.Never, "bitmap");
        }
        DirtyBitmap? bitmap = null;
        if (r.Bitmap is { } name)
        {
            bitmap = source.TryGetDirtyBitmaps()?.Find(name) ?? throw new BlockException($"Bitmap '{name}' could not be found");
            if (!hasMode)
            {
                throw new BlockException("Bitmap sync mode must be given when providing a bitmap");
            }
            bitmap.Check(BitmapCheck.AllowReadOnly);
            if (sync == "none")
            {
                throw new BlockException("sync mode 'none' does not produce meaningful bitmap outputs");
            }
            if (mode == BitmapSyncMode.Never && sync != "bitmap")
            {
                throw new BlockException($"Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync}'");
            }
        }
        if (bitmap is null && hasMode)
        {
            throw new BlockException("Cannot specify bitmap sync mode without a bitmap");
        }
        if (ReferenceEquals(source, target))
        {
            throw new BlockException("Source and target cannot be the same");
        }
        if (r.Compress && !target.SupportsCompressedWrites)
        {
            // QEMU names the drive by its BlockBackend, which a node in QSD has none of: the name is empty.
            throw new BlockException("Compression is not supported for this drive ");
        }
        if (jobs.Jobs.OfType<BackupJob>().Any(j => ReferenceEquals(j.Target, target) && j.Status != JobStatus.Null))
        {
            throw new BlockException($"Node '{target.NodeName}' is busy: {BackupJob.BusyReason}");
        }
        if (r.MaxWorkers is { } w && (w < 1 || w > int.MaxValue))
        {
            throw new BlockException($"max-workers must be between 1 and {int.MaxValue}");
        }
        if (r.MaxChunk is < 0)
        {
            throw new BlockException("max-chunk must be zero (which means no limit) or positive");
        }
        if (bitmap is not null && mode != BitmapSyncMode.Never)
        {
            bitmap.Check(BitmapCheck.Default);
        }
        if (source.Length != target.Length)
        {
            throw new BlockException("Source and target image have different sizes");
        }
        var cluster = BackupJob.ClusterSize(target);
        if (r.MaxChunk is > 0 and var chunk && chunk < cluster)
        {
            throw new BlockException($"Required max-chunk ({chunk}) is less than backup cluster size ({cluster})");
        }
        if (target.ReadOnly)
        {
            throw new BlockException($"Block node is read-only");
        }
        // QEMU appends the filter (bdrv_cbw_append) before it creates the job, so a bad filter name is
        // reported before a bad job id; the filter's block copy checks min-cluster-size first.
        BlockCopy.CheckMinClusterSize(r.MinClusterSize ?? 0);
        var copyOptions = new BlockCopyOptions
        {
            MinClusterSize = (long)(r.MinClusterSize ?? 0),
            MaxChunk = (int)Math.Min(r.MaxChunk ?? 0, int.MaxValue),
            Compress = r.Compress,
            DiscardSource = r.DiscardSource,
            // The job lets guest writes copy once it has taken its point in time.
            StartInactive = true,
            // The job copies whatever guest copies leave; sync=none leaves the target what they saved, as QEMU's.
            GuestCopiesAtWriteSize = sync != "none",
        };
        var filter = (CopyBeforeWriteNode)graph.InsertFilter(r.FilterNodeName, source,
            context => new CopyBeforeWriteNode(context, source, target, new BlockCopy(source, target, copyOptions),
                r.OnCbwError == "break-snapshot" ? OnCbwError.BreakSnapshot : OnCbwError.BreakGuestWrite));
        try
        {
            jobs.CheckNewId(r.JobId);
            if (r.Speed is < 0)
            {
                throw new BlockException("Parameter 'speed' expects a non-negative value");
            }
            return CreateJob(r, source, target, release, sync, bitmap, mode, filter);
        }
        catch
        {
            graph.RemoveFilter(filter);
            filter.Detach();
            throw;
        }
    }

    private BackupJob CreateJob(BackupRequest r, BlockNode source, BlockNode target, Func<ValueTask>? release, string sync,
        DirtyBitmap? bitmap, BitmapSyncMode mode, CopyBeforeWriteNode filter)
    {
        var speed = r.Speed ?? 0;
        var job = new BackupJob(jobs, new JobSettings(r.JobId!, r.AutoFinalize, r.AutoDismiss, speed), new BackupSettings
        {
            Source = source,
            Target = target,
            Sync = sync switch
            {
                "full" => BackupSyncMode.Full,
                "top" => BackupSyncMode.Top,
                "none" => BackupSyncMode.None,
                _ => BackupSyncMode.Bitmap,
            },
            Bitmap = bitmap,
            BitmapMode = mode,
            OnSourceError = r.OnSourceError ?? "report",
            OnTargetError = r.OnTargetError ?? "report",
            MaxChunk = (int)Math.Min(r.MaxChunk ?? 0, int.MaxValue),
            Compress = r.Compress,
            MaxWorkers = (int)Math.Min(r.MaxWorkers ?? 0, int.MaxValue),
            MinClusterSize = (long)(r.MinClusterSize ?? 0),
            ReleaseTarget = release,
            Filter = filter,
            RemoveFilter = () => graph.RemoveFilter(filter),
        });
        return job;
    }


    private static BitmapSyncMode ParseMode(string? mode) => mode switch
    {
        "never" => BitmapSyncMode.Never,
        "always" => BitmapSyncMode.Always,
        _ => BitmapSyncMode.OnSuccess,
    };

    /// <summary>The backing node of a format node (skipping raw's file), if any.</summary>
    private static BlockNode? BackingOf(BlockNode node) =>
        node.Children.FirstOrDefault(c => c.Role == "backing")?.Node;

    /// <summary>The format of an image on a node that is not a host file (an NBD export): qcow2's magic, else raw.</summary>
    private async Task<string> ProbeNodeAsync(BlockOptions protocol, CancellationToken cancellationToken)
    {
        var node = await graph.OpenOwnedAsync(protocol, cancellationToken).ConfigureAwait(false);
        try
        {
            var header = new byte[4];
            if (node.Length < header.Length)
            {
                return "raw";
            }
            await node.ReadAsync(0, header, cancellationToken).ConfigureAwait(false);
            return header is [(byte)'Q', (byte)'F', (byte)'I', 0xfb] ? "qcow2" : "raw";
        }
        finally
        {
            await graph.ReleaseAsync(node).ConfigureAwait(false);
        }
    }

    /// <summary>
    /// bdrv_img_create on a remote export: raw needs nothing (the export has its size); qcow2 is written onto
    /// the export, as QEMU formats an image on any protocol node.
    /// </summary>
    private async Task FormatRemoteAsync(BlockOptions protocol, string format, long size, BlockNode? backing, CancellationToken cancellationToken)
    {
        if (format is not ("qcow2" or "raw"))
        {
            throw new BlockException(graph.DriverNames.Contains(format)
                ? $"Format driver '{format}' does not support image creation"
                : $"Unknown driver '{format}'");
        }
        if (format == "raw")
        {
            return;
        }
        var node = await graph.OpenOwnedAsync(protocol, cancellationToken).ConfigureAwait(false);
        try
        {
            await Qcow2Creator.CreateAsync(node, new Qcow2CreateOptions
            {
                Size = size,
                BackingFile = backing?.Filename,
                BackingFormat = backing?.DriverName,
            }, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            await graph.ReleaseAsync(node).ConfigureAwait(false);
        }
    }

    private static async Task<string> ProbeAsync(string path)
    {
        var header = new byte[4];
        try
        {
            await using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
            var n = await f.ReadAsync(header).ConfigureAwait(false);
            return n == 4 && header is [(byte)'Q', (byte)'F', (byte)'I', 0xfb] ? "qcow2" : "raw";
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Could not open '{path}': {Block.Posix.LibC.Describe(Block.Posix.LibC.ErrnoOf(e))}", e);
        }
    }

    /// <summary>bdrv_img_create: a qcow2 (backed by <paramref name="backing"/>'s file for sync=top) or a raw file of the source's size.</summary>
    private async Task CreateImageAsync(string path, string format, long size, BlockNode? backing, CancellationToken cancellationToken)
    {
        if (format is not ("qcow2" or "raw"))
        {
            throw new BlockException(graph.DriverNames.Contains(format)
                ? $"Format driver '{format}' does not support image creation"
                : $"Unknown driver '{format}'");
        }
        try
        {
            await using (var f = new FileStream(path, FileMode.Create, FileAccess.ReadWrite, FileShare.ReadWrite))
            {
                if (format == "raw")
                {
                    f.SetLength(size);
                }
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Could not create '{path}': {Block.Posix.LibC.Describe(Block.Posix.LibC.ErrnoOf(e))}", e);
        }
        if (format == "raw")
        {
            return;
        }
        var file = await graph.OpenOwnedAsync(new BlockOptions { ["driver"] = "file", ["filename"] = path }, cancellationToken).ConfigureAwait(false);
        try
        {
            await Qcow2Creator.CreateAsync(file, new Qcow2CreateOptions
            {
                Size = size,
                BackingFile = backing?.Filename,
                BackingFormat = backing?.DriverName,
            }, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            await graph.ReleaseAsync(file).ConfigureAwait(false);
        }
    }
}
