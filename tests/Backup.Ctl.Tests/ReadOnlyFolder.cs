using System.Diagnostics;

namespace Backup.Ctl.Tests;

/// <summary>
/// Makes a folder unwritable for everyone, root included (tests run as root in CI, where mode bits do not stop
/// writes): the immutable attribute where the file system has it, else mode 0555.
/// </summary>
[System.Runtime.Versioning.UnsupportedOSPlatform("windows")]
public sealed class ReadOnlyFolder : IAsyncDisposable
{
    private readonly string _path;
    private readonly bool _immutable;

    private ReadOnlyFolder(string path, bool immutable)
    {
        _path = path;
        _immutable = immutable;
    }

    public static async Task<ReadOnlyFolder> MakeAsync(string path)
    {
        if (await ChattrAsync("+i", path) == 0)
        {
            return new ReadOnlyFolder(path, immutable: true);
        }
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserExecute | UnixFileMode.GroupRead | UnixFileMode.GroupExecute
            | UnixFileMode.OtherRead | UnixFileMode.OtherExecute);
        var probe = Path.Combine(path, ".probe");
        try
        {
            await File.WriteAllTextAsync(probe, "");
            File.Delete(probe);
            throw new InvalidOperationException($"cannot make {path} unwritable here (no chattr +i, and mode bits do not stop this user)");
        }
        catch (UnauthorizedAccessException)
        {
        }
        return new ReadOnlyFolder(path, immutable: false);
    }

    private static async Task<int> ChattrAsync(string flag, string path)
    {
        try
        {
            var psi = new ProcessStartInfo("chattr") { RedirectStandardError = true, RedirectStandardOutput = true };
            psi.ArgumentList.Add(flag);
            psi.ArgumentList.Add(path);
            using var p = Process.Start(psi)!;
            await p.WaitForExitAsync();
            return p.ExitCode;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return -1;
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_immutable)
        {
            await ChattrAsync("-i", _path);
        }
        else
        {
            File.SetUnixFileMode(_path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        }
    }
}
