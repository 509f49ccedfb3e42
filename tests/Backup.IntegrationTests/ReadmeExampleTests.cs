using System.Text.RegularExpressions;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>README's worked example is run as written, against the demo daemon: the docs cannot rot.</summary>
public partial class ReadmeExampleTests
{
    private static List<string> Section(string heading)
    {
        var readme = File.ReadAllLines(Path.Combine(DocExample.RepoRoot(), "README.md"));
        return readme.SkipWhile(l => !l.StartsWith(heading, StringComparison.Ordinal)).Skip(1)
            .TakeWhile(l => !l.StartsWith("## ", StringComparison.Ordinal)).ToList();
    }

    private static string WorkedExample()
    {
        var code = Section("## Full and incremental").SkipWhile(l => l != "```python").Skip(1).TakeWhile(l => l != "```").ToList();
        code.Should().NotBeEmpty("README has the worked example");
        return string.Join('\n', code) + "\n";
    }

    [Fact]
    public async Task The_full_and_incremental_example_works_as_written() =>
        (await DocExample.RunAsync(WorkedExample())).Should().Contain("Images are identical.");

    /// <summary>
    /// A reader who follows README in order runs the QMP session (its bitmap, NBD server and export, the
    /// qemu-io write through the export) and then the worked example on the same demo daemon.
    /// </summary>
    [Fact]
    public async Task The_qmp_session_then_the_worked_example_work_in_order_on_one_daemon()
    {
        var session = Section("## A QMP session");
        var requests = session.Where(l => l.StartsWith("-> ", StringComparison.Ordinal)).Select(l => l[3..]).ToList();
        requests.Should().Contain(r => r.Contains("block-dirty-bitmap-add", StringComparison.Ordinal));
        var guestWrite = GuestWrite().Match(string.Join('\n', session));
        guestWrite.Success.Should().BeTrue("the section shows a qemu-io write through the export");

        var preamble = $$"""
            import json, socket, subprocess
            s = socket.socket(socket.AF_UNIX); s.connect("state/qmp.sock"); r = s.makefile("rwb")
            r.readline()
            for request in {{System.Text.Json.JsonSerializer.Serialize(requests)}}:
                r.write(request.encode() + b"\n"); r.flush()
                while "event" in (reply := json.loads(r.readline())):
                    pass
                assert "return" in reply, (request, reply)
            subprocess.run({{System.Text.Json.JsonSerializer.Serialize(guestWrite.Groups[1].Value)}}, shell=True, check=True)
            s.close()

            """;
        (await DocExample.RunAsync(preamble + WorkedExample())).Should().Contain("Images are identical.");
    }

    [GeneratedRegex("`(qemu-io [^`]+)`")]
    private static partial Regex GuestWrite();
}
