using System.Text.RegularExpressions;
using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests.Operations;

/// <summary>
/// What a newcomer's clone must not carry: paths of one engineer's machine, references to a tracker
/// they cannot see, or files a test run left behind (sockets).
/// </summary>
public partial class RepositoryHygieneTests
{
    private static async Task<List<string>> TrackedFilesAsync()
    {
        var listing = await Tool.RunAsync("git", "-C", DocExample.RepoRoot(), "ls-files", "-z");
        return listing.Split('\0', StringSplitOptions.RemoveEmptyEntries).ToList();
    }

    private static async Task<List<string>> LinesMatchingAsync(Regex pattern)
    {
        var root = DocExample.RepoRoot();
        var hits = new List<string>();
        foreach (var file in await TrackedFilesAsync())
        {
            var path = Path.Combine(root, file);
            if (!File.Exists(path) || new FileInfo(path).Length > 4 << 20)
            {
                continue;
            }
            var bytes = await File.ReadAllBytesAsync(path);
            if (Array.IndexOf(bytes, (byte)0) >= 0)
            {
                continue; // binary
            }
            var lines = System.Text.Encoding.UTF8.GetString(bytes).Split('\n');
            for (var i = 0; i < lines.Length; i++)
            {
                if (pattern.IsMatch(lines[i]))
                {
                    hits.Add($"{file}:{i + 1}: {lines[i].Trim()}");
                }
            }
        }
        return hits;
    }

    [Fact]
    public async Task No_file_names_a_path_of_one_machine() =>
        (await LinesMatchingAsync(MachinePath())).Should().BeEmpty("paths must be relative to the checkout or chosen by the reader");

    [Fact]
    public async Task No_file_cites_an_issue_number() =>
        (await LinesMatchingAsync(IssueReference())).Should().BeEmpty("say what the issue meant: the tracker is not in the repository");

    [Fact]
    public async Task No_socket_or_leftover_state_is_tracked() =>
        (await TrackedFilesAsync()).Should().NotContain(f => f.EndsWith(".sock", StringComparison.Ordinal) || f.EndsWith(".pid", StringComparison.Ordinal));

    // Home and work folders of the machines this was written on; built from parts so that this file does not match itself.
    [GeneratedRegex("(^|[^A-Za-z0-9_.])/(" + "work|home|root|Users" + ")/")]
    private static partial Regex MachinePath();

    [GeneratedRegex(@"\b[Ii]ssue[s]? #?[0-9]+\b")]
    private static partial Regex IssueReference();
}
