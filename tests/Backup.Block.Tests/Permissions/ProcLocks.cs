using Backup.Block.Tests.Qcow2;

namespace Backup.Block.Tests.Permissions;

/// <summary>The bytes of a file covered by OFD locks, as /proc/locks lists them (any process).</summary>
internal static class ProcLocks
{
    public static int[] Bytes(string path)
    {
        var inode = Inode(path);
        var bytes = new SortedSet<int>();
        foreach (var line in System.IO.File.ReadAllLines("/proc/locks"))
        {
            // "1: OFDLCK ADVISORY READ -1 fd:01:1234 100 101"
            var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (f.Length < 8 || f[1] != "OFDLCK" || f[5].Split(':')[^1] != inode.ToString(System.Globalization.CultureInfo.InvariantCulture))
            {
                continue;
            }
            for (var b = int.Parse(f[6], System.Globalization.CultureInfo.InvariantCulture); b <= int.Parse(f[7], System.Globalization.CultureInfo.InvariantCulture); b++)
            {
                bytes.Add(b);
            }
        }
        return [.. bytes];
    }

    private static long Inode(string path)
    {
        var output = QemuTools.Ok("stat", "-c", "%i", path);
        return long.Parse(output.Trim(), System.Globalization.CultureInfo.InvariantCulture);
    }
}
