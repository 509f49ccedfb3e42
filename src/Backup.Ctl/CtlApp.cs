using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Backup.Ctl.Backups;
using Backup.Ctl.Bitmaps;
using Backup.Ctl.Chains;
using Backup.Qmp.Client;
using Spectre.Console;

namespace Backup.Ctl;

/// <summary>
/// backupctl's command line (System.CommandLine) and the glue around every command: where output goes,
/// how failures become exit codes and <c>--json</c> results. The commands themselves live in Backups/,
/// Chains/ and Bitmaps/.
/// </summary>
public sealed class CtlApp
{
    private readonly TextWriter _stdout;
    private readonly TextWriter _stderr;
    private readonly IReadOnlyDictionary<string, string?> _environment;
    private readonly bool _interactive;

    private readonly Option<string?> _qmp = new("--qmp")
    {
        Description = "the daemon's QMP socket: unix:PATH or tcp:HOST:PORT (default: $BACKUPD_STATE_DIR/qmp.sock, else ./state/qmp.sock)",
        Recursive = true,
    };

    private readonly Option<string?> _config = new("--config")
    {
        Description = "backupd's --config file; its first QMP socket is used",
        Recursive = true,
    };

    private readonly Option<bool> _json = new("--json")
    {
        Description = "for scripts: the result as one JSON object on the last line of standard output; messages on standard error",
        Recursive = true,
    };

    public CtlApp(TextWriter stdout, TextWriter stderr, IReadOnlyDictionary<string, string?> environment, bool interactive)
    {
        _stdout = stdout;
        _stderr = stderr;
        _environment = environment;
        _interactive = interactive;
    }

    /// <summary>Parses <paramref name="args"/> and runs the command; returns the exit code (<see cref="ExitCodes"/>).</summary>
    public async Task<int> RunAsync(string[] args, CancellationToken cancellationToken)
    {
        var root = BuildCommands();
        var parse = root.Parse(args);
        if (parse.Errors.Count > 0)
        {
            var json = args.Contains("--json");
            foreach (var error in parse.Errors)
            {
                await _stderr.WriteLineAsync("backupctl: " + error.Message).ConfigureAwait(false);
            }
            await _stderr.WriteLineAsync("Try 'backupctl --help' for more information.").ConfigureAwait(false);
            if (json)
            {
                await _stdout.WriteLineAsync(new JsonObject
                {
                    ["ok"] = false, ["exit-code"] = ExitCodes.Usage, ["error"] = string.Join("; ", parse.Errors.Select(e => e.Message)),
                }.ToJsonString()).ConfigureAwait(false);
            }
            return ExitCodes.Usage;
        }
        return await parse.InvokeAsync(new InvocationConfiguration { Output = _stdout, Error = _stderr }, cancellationToken).ConfigureAwait(false);
    }

    public RootCommand BuildCommands()
    {
        var root = new RootCommand("backupctl: full, incremental and differential backups with backupd, chains, bitmaps, QMP")
        {
            _qmp, _config, _json,
            BackupCommand(), ChainCommand(), BitmapCommand(), QmpCommand(), EventsCommand(),
        };
        return root;
    }

    // ---- backup ----

    private Command BackupCommand()
    {
        var backup = new Command("backup", "make a backup of one or more drives at one instant");
        foreach (var (kind, text) in new[]
        {
            (BackupKind.Full, "everything; starts a new chain and resets both bitmaps"),
            (BackupKind.Inc, "what changed since the previous backup; backed by it"),
            (BackupKind.Diff, "what changed since the last full backup; backed by it"),
        })
        {
            var drive = new Option<string[]>("--drive") { Description = "a drive (node name); repeat for several", Required = true };
            var dir = new Option<string>("--dir") { Description = "the chain folder", Required = true };
            var chunk = new Option<int>("--chunk-size") { Description = "bytes per manifest digest (full backups; a power of two)", DefaultValueFactory = _ => Images.ContentDigest.DefaultChunkSize };
            var speed = new Option<long>("--speed") { Description = "bytes per second each drive's job may copy, guest-triggered copies included (0: no limit)" };
            var command = new Command(kind.ToString().ToLowerInvariant(), text) { drive, dir, chunk, speed };
            command.SetAction((p, ct) => RunAsync(new Invocation(p, ct), async (output, token) =>
            {
                var size = p.GetValue(chunk);
                if (size < 4096 || (size & (size - 1)) != 0)
                {
                    throw new CtlException($"--chunk-size {size}: expected a power of two of at least 4096", ExitCodes.Usage);
                }
                var limit = p.GetValue(speed);
                if (limit < 0)
                {
                    throw new CtlException($"--speed {limit}: expected a number of bytes per second, 0 for no limit", ExitCodes.Usage);
                }
                var dirPath = p.GetValue(dir)!;
                var existing = ChainFolder.Load(dirPath);
                if (kind != BackupKind.Full && existing.Backups.Count > 0)
                {
                    size = existing.Backups[^1].ChunkSize;
                }
                await using var qmp = await ConnectAsync(p, token).ConfigureAwait(false);
                return await new BackupRunner(qmp, output) { ChunkSize = size, Speed = limit }
                    .RunAsync(kind, p.GetValue(drive)!, dirPath, token).ConfigureAwait(false);
            }));
            backup.Subcommands.Add(command);
        }
        return backup;
    }

    // ---- chain ----

    private Command ChainCommand()
    {
        var chain = new Command("chain", "the backups in a chain folder");

        var listDir = new Argument<string>("DIR") { Description = "the chain folder" };
        var list = new Command("list", "the backups, oldest first, with times and sizes") { listDir };
        list.SetAction((p, ct) => RunAsync(new Invocation(p, ct), (output, _) => Task.FromResult(ListChain(output, ChainFolder.Load(p.GetValue(listDir)!)))));
        chain.Subcommands.Add(list);

        var verifyDir = new Argument<string>("DIR") { Description = "the chain folder" };
        var verify = new Command("verify", "check every image, backing link and digest") { verifyDir };
        verify.SetAction((p, ct) => RunAsync(new Invocation(p, ct), async (output, token) =>
        {
            var folder = ChainFolder.Load(p.GetValue(verifyDir)!);
            if (folder.Backups.Count == 0)
            {
                throw new CtlException($"{folder.Path}: no backups");
            }
            var problems = await ChainVerifier.VerifyAsync(folder, output.Say, token).ConfigureAwait(false);
            if (problems.Count > 0)
            {
                foreach (var problem in problems)
                {
                    output.Say("FAILED: " + problem);
                }
                throw new CtlException($"verify found {problems.Count} problem(s); first: {problems[0]}", ExitCodes.Failed, new JsonObject
                {
                    ["problems"] = new JsonArray(problems.Select(x => (JsonNode)new JsonObject
                    {
                        ["sequence"] = x.Sequence, ["drive"] = x.Drive, ["image"] = x.Image, ["offset"] = x.Offset, ["problem"] = x.Problem,
                    }).ToArray()),
                });
            }
            output.Say($"{folder.Backups.Count} backup(s) verified: images, backing links and content digests are as recorded");
            return new JsonObject { ["ok"] = true, ["backups"] = folder.Backups.Count, ["problems"] = new JsonArray() };
        }));
        chain.Subcommands.Add(verify);

        var restoreDir = new Argument<string>("DIR") { Description = "the chain folder" };
        var drive = new Option<string>("--drive") { Description = "the drive to restore", Required = true };
        var to = new Option<string>("--to") { Description = "the new image to write (must not exist)", Required = true };
        var at = new Option<string?>("--at") { Description = "the newest backup made at or before this time (or this sequence number); default: the newest" };
        var format = new Option<string?>("--format") { Description = "raw or qcow2 (default: qcow2 for a .qcow2 name, else raw)" };
        format.AcceptOnlyFromAmong("raw", "qcow2");
        var restore = new Command("restore", "write a drive as of a backup to a new image") { restoreDir, drive, to, at, format };
        restore.SetAction((p, ct) => RunAsync(new Invocation(p, ct), async (output, token) =>
        {
            var folder = ChainFolder.Load(p.GetValue(restoreDir)!);
            var name = p.GetValue(drive)!;
            var backup = folder.Select(name, p.GetValue(at))
                ?? throw new CtlException($"{folder.Path}: no backup of '{name}'{(p.GetValue(at) is { } a ? " at or before " + a : "")}");
            var target = p.GetValue(to)!;
            var fmt = p.GetValue(format) ?? (target.EndsWith(".qcow2", StringComparison.OrdinalIgnoreCase) ? "qcow2" : "raw");
            await ChainRestorer.RestoreAsync(folder, backup, name, target, fmt, null, token).ConfigureAwait(false);
            output.Say($"{name} as of backup {backup.Sequence} ({backup.Kind}, {backup.Time.ToString("u", CultureInfo.InvariantCulture)}) written to {target} ({fmt})");
            return new JsonObject
            {
                ["ok"] = true, ["drive"] = name, ["sequence"] = backup.Sequence, ["kind"] = backup.Kind,
                ["time"] = backup.Time.ToString("O", CultureInfo.InvariantCulture), ["to"] = Path.GetFullPath(target), ["format"] = fmt,
            };
        }));
        chain.Subcommands.Add(restore);
        return chain;
    }

    private static JsonObject ListChain(CtlOutput output, ChainFolder folder)
    {
        var table = new Table().AddColumns("#", "time (UTC)", "kind", "drive", "image", "file size", "copied", "backing");
        var rows = new JsonArray();
        foreach (var m in folder.Backups)
        {
            var drives = new JsonArray();
            foreach (var d in m.Drives)
            {
                var path = folder.PathOf(d.Image);
                var size = File.Exists(path) ? new FileInfo(path).Length : -1;
                table.AddRow(
                    m.Sequence.ToString(CultureInfo.InvariantCulture), m.Time.UtcDateTime.ToString("yyyy-MM-dd HH:mm:ss", CultureInfo.InvariantCulture),
                    m.Kind, Markup.Escape(d.Drive), Markup.Escape(d.Image), size < 0 ? "missing" : BackupRunner.Size(size), BackupRunner.Size(d.Copied),
                    Markup.Escape(d.Chain.Count > 1 ? d.Chain[^2] : "-"));
                drives.Add(new JsonObject
                {
                    ["drive"] = d.Drive, ["image"] = d.Image, ["file-size"] = size, ["copied"] = d.Copied, ["virtual-size"] = d.VirtualSize,
                    ["chain"] = new JsonArray(d.Chain.Select(c => (JsonNode)c!).ToArray()),
                });
            }
            rows.Add(new JsonObject
            {
                ["sequence"] = m.Sequence, ["kind"] = m.Kind, ["time"] = m.Time.ToString("O", CultureInfo.InvariantCulture), ["drives"] = drives,
            });
        }
        if (folder.Backups.Count == 0)
        {
            output.Say($"{folder.Path}: no backups");
        }
        else
        {
            output.Console.Write(table);
        }
        return new JsonObject { ["ok"] = true, ["dir"] = folder.Path, ["backups"] = rows };
    }

    // ---- bitmap ----

    private Command BitmapCommand()
    {
        var bitmap = new Command("bitmap", "dirty bitmaps: online through the daemon (--drive), or offline in a qcow2 image (--image)");

        Option<string?> DriveOption() => new("--drive") { Description = "a drive (node name) of the running daemon" };
        Option<string?> ImageOption() => new("--image") { Description = "a qcow2 image no daemon has open" };

        var listDrive = DriveOption();
        var listImage = ImageOption();
        var list = new Command("list", "the bitmaps (all drives' when neither --drive nor --image is given)") { listDrive, listImage };
        list.SetAction((p, ct) => RunAsync(new Invocation(p, ct), async (output, token) =>
        {
            List<BitmapView> views;
            if (p.GetValue(listImage) is { } image)
            {
                views = await OfflineBitmaps.ListAsync(image, token).ConfigureAwait(false);
            }
            else
            {
                await using var qmp = await ConnectAsync(p, token).ConfigureAwait(false);
                views = await OnlineBitmaps.ListAsync(qmp, p.GetValue(listDrive), token).ConfigureAwait(false);
            }
            var table = new Table().AddColumns("node", "bitmap", "dirty", "granularity", "recording", "busy", "persistent", "inconsistent");
            foreach (var v in views)
            {
                table.AddRow(Markup.Escape(v.Node), Markup.Escape(v.Name), BackupRunner.Size(v.Count), BackupRunner.Size(v.Granularity),
                    Yes(v.Recording), Yes(v.Busy), Yes(v.Persistent), Yes(v.Inconsistent));
            }
            output.Console.Write(table);
            return new JsonObject { ["ok"] = true, ["bitmaps"] = new JsonArray(views.Select(v => (JsonNode)v.ToJson()).ToArray()) };
        }));
        bitmap.Subcommands.Add(list);

        var inspectName = new Argument<string>("NAME") { Description = "the bitmap" };
        var inspectDrive = DriveOption();
        var inspectImage = ImageOption();
        var inspect = new Command("inspect", "one bitmap's state and SHA-256; offline, also consistency checks") { inspectName, inspectDrive, inspectImage };
        inspect.SetAction((p, ct) => RunAsync(new Invocation(p, ct), async (output, token) =>
        {
            var name = p.GetValue(inspectName)!;
            BitmapView view;
            List<string> problems = [];
            if (p.GetValue(inspectImage) is { } image)
            {
                (view, problems) = await OfflineBitmaps.InspectAsync(image, name, token).ConfigureAwait(false);
            }
            else
            {
                var drive = p.GetValue(inspectDrive) ?? throw new CtlException("say which drive (--drive) or image (--image)", ExitCodes.Usage);
                await using var qmp = await ConnectAsync(p, token).ConfigureAwait(false);
                view = await OnlineBitmaps.InspectAsync(qmp, drive, name, token).ConfigureAwait(false);
            }
            var grid = new Grid().AddColumn().AddColumn();
            foreach (var (k, v) in view.ToJson())
            {
                grid.AddRow(Markup.Escape(k), Markup.Escape(v?.ToString() ?? ""));
            }
            output.Console.Write(grid);
            foreach (var problem in problems)
            {
                output.Say("PROBLEM: " + problem);
            }
            if (problems.Count > 0)
            {
                throw new CtlException(problems[0], ExitCodes.Failed, new JsonObject { ["bitmap"] = view.ToJson() });
            }
            var result = view.ToJson();
            return new JsonObject { ["ok"] = true, ["bitmap"] = result };
        }));
        bitmap.Subcommands.Add(inspect);

        var removeName = new Argument<string>("NAME") { Description = "the bitmap" };
        var removeDrive = DriveOption();
        var removeImage = ImageOption();
        var remove = new Command("remove", "delete a bitmap") { removeName, removeDrive, removeImage };
        remove.SetAction((p, ct) => RunAsync(new Invocation(p, ct), async (output, token) =>
        {
            var name = p.GetValue(removeName)!;
            if (p.GetValue(removeImage) is { } image)
            {
                await OfflineBitmaps.RemoveAsync(image, name, token).ConfigureAwait(false);
                output.Say($"bitmap '{name}' removed from {image}");
                return new JsonObject { ["ok"] = true, ["image"] = image, ["removed"] = name };
            }
            var drive = p.GetValue(removeDrive) ?? throw new CtlException("say which drive (--drive) or image (--image)", ExitCodes.Usage);
            await using var qmp = await ConnectAsync(p, token).ConfigureAwait(false);
            await OnlineBitmaps.RemoveAsync(qmp, drive, name, token).ConfigureAwait(false);
            output.Say($"bitmap '{name}' removed from {drive}");
            return new JsonObject { ["ok"] = true, ["drive"] = drive, ["removed"] = name };
        }));
        bitmap.Subcommands.Add(remove);
        return bitmap;
    }

    private static string Yes(bool b) => b ? "yes" : "no";

    // ---- qmp, events ----

    private Command QmpCommand()
    {
        var name = new Argument<string>("COMMAND") { Description = "a QMP command, e.g. query-jobs" };
        var arguments = new Argument<string?>("ARGUMENTS") { Description = "its arguments as a JSON object", Arity = ArgumentArity.ZeroOrOne };
        var command = new Command("qmp", "run one QMP command and print its return value as JSON") { name, arguments };
        command.SetAction((p, ct) => RunAsync(new Invocation(p, ct), async (output, token) =>
        {
            JsonObject? args = null;
            if (p.GetValue(arguments) is { } text)
            {
                try
                {
                    args = JsonNode.Parse(text) as JsonObject ?? throw new CtlException("ARGUMENTS must be a JSON object", ExitCodes.Usage);
                }
                catch (JsonException e)
                {
                    throw new CtlException($"ARGUMENTS: {e.Message}", ExitCodes.Usage);
                }
            }
            await using var qmp = await ConnectAsync(p, token).ConfigureAwait(false);
            var result = await qmp.ExecuteAsync(p.GetValue(name)!, args, token).ConfigureAwait(false);
            if (!output.Json)
            {
                output.Line(result?.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) ?? "null");
            }
            return new JsonObject { ["ok"] = true, ["return"] = result?.DeepClone() };
        }));
        return command;
    }

    private Command EventsCommand()
    {
        var count = new Option<int?>("--count") { Description = "stop after this many events" };
        var timeout = new Option<double?>("--timeout") { Description = "stop after this many seconds" };
        var command = new Command("events", "follow the daemon's events, one JSON object per line, until interrupted") { count, timeout };
        command.SetAction((p, ct) => RunAsync(new Invocation(p, ct), async (output, token) =>
        {
            await using var qmp = await ConnectAsync(p, token).ConfigureAwait(false);
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(token);
            if (p.GetValue(timeout) is { } seconds)
            {
                stop.CancelAfter(TimeSpan.FromSeconds(seconds));
            }
            var limit = p.GetValue(count);
            var seen = 0;
            try
            {
                await foreach (var e in qmp.Events.ReadAllAsync(stop.Token).ConfigureAwait(false))
                {
                    output.Line(e.Message.ToJsonString());
                    if (++seen == limit)
                    {
                        break;
                    }
                }
            }
            catch (OperationCanceledException) when (!token.IsCancellationRequested)
            {
            }
            return new JsonObject { ["ok"] = true, ["events"] = seen, ["closed"] = qmp.IsClosed };
        }));
        return command;
    }

    // ---- glue ----

    private async Task<QmpClient> ConnectAsync(ParseResult p, CancellationToken cancellationToken)
    {
        var address = DaemonConnection.Resolve(p.GetValue(_qmp), p.GetValue(_config), _environment);
        return await DaemonConnection.ConnectAsync(address, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Runs a command body; failures become a message, an exit code and, with --json, a result object.</summary>
    private async Task<int> RunAsync(Invocation invocation, Func<CtlOutput, CancellationToken, Task<JsonObject>> body)
    {
        var (p, cancellationToken) = invocation;
        var output = new CtlOutput(_stdout, _stderr, p.GetValue(_json), _interactive);
        int code;
        string message;
        JsonObject? details = null;
        try
        {
            output.Result(await body(output, cancellationToken).ConfigureAwait(false));
            return ExitCodes.Ok;
        }
        catch (CtlException e)
        {
            (code, message, details) = (e.ExitCode, e.Message, e.Details);
        }
        catch (QmpErrorException e)
        {
            (code, message) = (ExitCodes.Failed, e.Message);
            details = new JsonObject { ["class"] = e.Class, ["desc"] = e.Desc };
        }
        catch (QmpConnectionException e)
        {
            (code, message) = (ExitCodes.Failed, e.Message);
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            (code, message) = (ExitCodes.Failed, "interrupted");
        }
        await _stderr.WriteLineAsync("backupctl: " + message).ConfigureAwait(false);
        var result = new JsonObject { ["ok"] = false, ["exit-code"] = code, ["error"] = message };
        foreach (var (k, v) in details ?? [])
        {
            result[k] = v?.DeepClone();
        }
        output.Result(result);
        return code;
    }

    /// <summary>What System.CommandLine hands an action.</summary>
    private readonly record struct Invocation(ParseResult Parse, CancellationToken Token);
}
