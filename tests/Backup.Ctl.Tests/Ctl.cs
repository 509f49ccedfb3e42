using System.Text.Json.Nodes;

namespace Backup.Ctl.Tests;

/// <summary>What one backupctl run printed and returned.</summary>
public sealed record CtlRun(int ExitCode, string Stdout, string Stderr)
{
    /// <summary>The <c>--json</c> result: the last line of standard output.</summary>
    public JsonObject Json => JsonNode.Parse(Stdout.TrimEnd('\n').Split('\n')[^1])!.AsObject();

    public override string ToString() => $"exit {ExitCode}\n{Stdout}\n{Stderr}";
}

/// <summary>Runs backupctl through its entry point, in-process, with its output captured.</summary>
public static class Ctl
{
    public static Task<CtlRun> RunAsync(IReadOnlyDictionary<string, string?>? environment, params string[] args) =>
        RunAsync(environment, interactive: false, args);

    /// <summary>With <paramref name="interactive"/>, as on a terminal: live progress bars.</summary>
    public static async Task<CtlRun> RunAsync(IReadOnlyDictionary<string, string?>? environment, bool interactive, params string[] args)
    {
        using var stdout = new StringWriter();
        using var stderr = new StringWriter();
        var app = new CtlApp(stdout, stderr, environment ?? new Dictionary<string, string?>(), interactive);
        var code = await app.RunAsync(args, CancellationToken.None);
        return new CtlRun(code, stdout.ToString(), stderr.ToString());
    }

    public static Task<CtlRun> RunAsync(params string[] args) => RunAsync(null, args);

    /// <summary>Runs and fails the test unless backupctl exits 0.</summary>
    public static async Task<CtlRun> OkAsync(params string[] args)
    {
        var run = await RunAsync(null, args);
        run.ExitCode.Should().Be(0, run.ToString());
        return run;
    }
}
