using Backup.Block;
using Backup.Block.Objects;
using Backup.Qmp.Commands;
using Backup.Qmp.Schema;

namespace Backup.Qmp.Tests;

public class SchemaTests
{
    private sealed class NullEvents : IEventSink
    {
        public void Emit(string name, IReadOnlyList<KeyValuePair<string, object?>> data) { }
    }

    private sealed class NoShutdown : IShutdownRequester
    {
        public void RequestShutdown(string reason) { }
    }

    internal static QmpDispatcher Dispatcher()
    {
        var graph = BlockGraph.CreateDefault();
        var bitmaps = new BitmapCommands(graph);
        return new(SchemaLoader.Default,
    [
        bitmaps,
        new Backup.Qmp.Transactions.TransactionCommands([bitmaps, BackupActions(graph)], graph),
        new ControlCommands(SchemaLoader.Default, VersionInfo.Current, new NoShutdown()),
        new BlockCoreCommands(BlockGraph.CreateDefault()),
        new Backup.Diagnostics.HumanMonitorCommand(BlockGraph.CreateDefault(),
            new Backup.Diagnostics.QemuIo.QemuIoInterpreter(new Backup.Diagnostics.QemuIo.StdioConsole(), new Backup.Diagnostics.QemuIo.AioRequests())),
        new Backup.Nbd.Commands.NbdCommands(new Backup.Nbd.Server.NbdServer(BlockGraph.CreateDefault(), new NullEvents())),
        new ObjectCommands(new ObjectRegistry()),
        new Backup.Jobs.Commands.JobCommands(new Backup.Jobs.JobManager(() => new NullEvents())),
        new Backup.Jobs.Commands.BackupCommands(new Backup.Jobs.BackupStarter(BlockGraph.CreateDefault(),
            new Backup.Jobs.JobManager(() => new NullEvents()))),
        new Backup.Jobs.Commands.CreateCommands(new Backup.Jobs.JobManager(() => new NullEvents()), BlockGraph.CreateDefault()),
    ]);
    }

    private static Backup.Jobs.Commands.BackupTransactionActions BackupActions(BlockGraph graph)
    {
        var jobs = new Backup.Jobs.JobManager(() => new NullEvents());
        return new(new Backup.Jobs.BackupStarter(graph, jobs), jobs);
    }

    [Fact]
    public void Every_transaction_action_of_the_schema_is_implemented()
    {
        var bitmaps = new BitmapCommands(BlockGraph.CreateDefault());
        var graph = BlockGraph.CreateDefault();
        var tx = new Backup.Qmp.Transactions.TransactionCommands([bitmaps, BackupActions(graph)], graph);
        var kinds = ((EnumType)SchemaLoader.Default.Types["TransactionActionKind"]).Values;
        tx.ActionTypes.Should().BeEquivalentTo(kinds);
    }

    [Fact]
    public void Every_schema_command_has_a_handler_and_every_handler_a_schema_entry()
    {
        using var d = Dispatcher();
        d.Schema.Commands.Should().ContainKeys("qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
            "quit", "blockdev-add", "blockdev-del", "query-named-block-nodes", "query-block");
    }

    [Fact]
    public void The_compiled_in_schema_is_the_schemas_folder()
    {
        var files = Directory.GetFiles(Path.Combine(RepoPaths.Root, "schemas"), "*.json").Select(Path.GetFileName).Order();
        SchemaLoader.EmbeddedNames().Select(n => n["schemas/".Length..]).Order().Should().Equal(files);
    }

    [Fact]
    public void Protocol_reference_is_generated_from_the_schema()
    {
        var path = Path.Combine(RepoPaths.Root, "docs", "protocol.md");
        var rendered = ProtocolDoc.Render(SchemaLoader.Default);
        if (Environment.GetEnvironmentVariable("BACKUPD_UPDATE_DOCS") == "1")
        {
            File.WriteAllText(path, rendered);
        }
        File.ReadAllText(path).Should().Be(rendered, "docs/protocol.md must be regenerated (BACKUPD_UPDATE_DOCS=1) after a schema change");
    }

    [Fact]
    public void Introspection_lists_every_command_event_and_reachable_type_once()
    {
        var info = SchemaIntrospection.Build(SchemaLoader.Default);
        var names = info.Select(e => e!["name"]!.GetValue<string>()).ToList();
        names.Should().OnlyHaveUniqueItems();
        names.Should().Contain(SchemaLoader.Default.Commands.Keys);
        foreach (var e in info)
        {
            foreach (var key in new[] { "arg-type", "ret-type", "element-type" })
            {
                if (e![key] is { } t)
                {
                    names.Should().Contain(t.GetValue<string>(), $"{e["name"]} refers to it");
                }
            }
            foreach (var m in e!["members"]?.AsArray() ?? [])
            {
                if (m!["type"] is { } mt)
                {
                    names.Should().Contain(mt.GetValue<string>());
                }
            }
        }
    }

    [Fact]
    public async Task Schema_examples_replay_against_the_dispatcher()
    {
        using var d = Dispatcher();
        foreach (var c in d.Schema.Commands.Values.Where(c => c.Name is "qmp_capabilities" or "quit"))
        {
            foreach (var ex in c.Examples)
            {
                var args = ex.Request["arguments"]?.AsObject();
                var result = await d.ExecuteAsync(c.Name, args?.DeepClone().AsObject(), new CommandContext(null), default);
                result!.ToJsonString().Should().Be(ex.Reply["return"]!.ToJsonString());
            }
        }
    }

    [Fact]
    public void Every_definition_is_documented()
    {
        var s = SchemaLoader.Default;
        s.Commands.Values.Should().OnlyContain(c => c.Doc.Length > 0 && c.Since != null);
        s.Types.Values.Where(t => t is not BuiltinType and not ArrayType && !t.Name.EndsWith("-arg", StringComparison.Ordinal))
            .Should().OnlyContain(t => !string.IsNullOrEmpty(t.Doc));
    }
}
