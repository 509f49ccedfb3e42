using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>
/// docs/backup-guide.md, run as written: each python block after the first (the helpers) runs against a
/// fresh demo daemon, with the helpers in front. An example that stops working turns CI red.
/// </summary>
public class GuideExampleTests
{
    /// <summary>The guide's sections that have an example: (heading, code).</summary>
    private static List<(string Heading, string Code)> Examples()
    {
        var lines = File.ReadAllLines(Path.Combine(DocExample.RepoRoot(), "docs", "backup-guide.md"));
        var examples = new List<(string, string)>();
        var heading = "";
        for (var i = 0; i < lines.Length; i++)
        {
            if (lines[i].StartsWith("## ", StringComparison.Ordinal))
            {
                heading = lines[i][3..];
            }
            else if (lines[i] == "```python")
            {
                var code = lines.Skip(i + 1).TakeWhile(l => l != "```").ToList();
                examples.Add((heading, string.Join('\n', code)));
                i += code.Count + 1;
            }
        }
        return examples;
    }

    public static TheoryData<string> Headings()
    {
        var data = new TheoryData<string>();
        foreach (var (heading, _) in Examples().Skip(1))
        {
            data.Add(heading);
        }
        return data;
    }

    [Fact]
    public void The_guide_has_the_helpers_and_examples()
    {
        var examples = Examples();
        examples.Should().HaveCountGreaterThan(4);
        examples[0].Code.Should().Contain("def execute");
    }

    [Theory]
    [MemberData(nameof(Headings))]
    public async Task The_example_works_as_written(string heading)
    {
        var examples = Examples();
        var code = examples[0].Code + "\n\n" + examples.First(e => e.Heading == heading).Code + "\nprint(\"example done\")\n";
        (await DocExample.RunAsync(code)).Should().Contain("example done");
    }
}
