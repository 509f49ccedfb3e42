using Backup.IntegrationTests.Support;

namespace Backup.IntegrationTests;

/// <summary>Runs every Transcripts/*.qmp scenario against the real daemon.</summary>
public class TranscriptTests
{
    public static TheoryData<string> Scenarios()
    {
        var data = new TheoryData<string>();
        foreach (var f in Directory.GetFiles(Path.Combine(AppContext.BaseDirectory, "Transcripts"), "*.qmp").Order())
        {
            data.Add(Path.GetFileName(f));
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(Scenarios))]
    public Task Transcript(string name) => TranscriptRunner.RunAsync(Path.Combine(AppContext.BaseDirectory, "Transcripts", name));
}
