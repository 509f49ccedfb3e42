using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>README's worked example is run as written, against the demo daemon: the docs cannot rot.</summary>
public class ReadmeExampleTests
{
    [Fact]
    public async Task The_full_and_incremental_example_works_as_written()
    {
        var readme = await File.ReadAllLinesAsync(Path.Combine(DocExample.RepoRoot(), "README.md"));
        var section = readme.SkipWhile(l => !l.StartsWith("## Full and incremental", StringComparison.Ordinal)).ToList();
        var code = section.SkipWhile(l => l != "```python").Skip(1).TakeWhile(l => l != "```").ToList();
        code.Should().NotBeEmpty("README has the worked example");
        (await DocExample.RunAsync(string.Join('\n', code) + "\n")).Should().Contain("Images are identical.");
    }
}
