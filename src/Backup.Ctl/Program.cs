using System.Collections;
using Backup.Ctl;

// Ctrl-C cancels the running command (System.CommandLine's token); a backup then reports what it left.
var environment = Environment.GetEnvironmentVariables().Cast<DictionaryEntry>()
    .ToDictionary(e => (string)e.Key, e => (string?)e.Value, StringComparer.Ordinal);
var app = new CtlApp(Console.Out, Console.Error, environment, interactive: !Console.IsOutputRedirected);
return await app.RunAsync(args, CancellationToken.None).ConfigureAwait(false);
