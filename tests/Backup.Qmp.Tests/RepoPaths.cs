namespace Backup.Qmp.Tests;

internal static class RepoPaths
{
    public static string Root { get; } = Find();

    private static string Find()
    {
        for (var d = new DirectoryInfo(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            if (File.Exists(Path.Combine(d.FullName, "Backup.sln")))
            {
                return d.FullName;
            }
        }
        throw new InvalidOperationException("Backup.sln not found above " + AppContext.BaseDirectory);
    }
}
