namespace Backup.Qcow2CrashWriter;

/// <summary>
/// The deterministic sequence of requests the crash writer issues, shared with the test (which links
/// this file) so that it can rebuild what every acknowledged request wrote.
/// </summary>
public static class CrashWorkload
{
    public enum Kind
    {
        Write,
        WriteZeroes,
        Flush,
    }

    public readonly record struct Op(Kind Kind, long Offset, int Length, int Seed);

    public static IEnumerable<Op> Ops(int seed, long size)
    {
        var rng = new Random(seed);
        for (var i = 0; ; i++)
        {
            var k = rng.Next(100);
            var len = rng.Next(1, 200_000);
            var off = rng.NextInt64(0, size - len);
            if (rng.Next(3) == 0)
            {
                off &= ~65535L;
            }
            yield return k switch
            {
                < 80 => new Op(Kind.Write, off, len, rng.Next()),
                < 95 => new Op(Kind.WriteZeroes, off, len, 0),
                _ => new Op(Kind.Flush, 0, 0, 0),
            };
        }
    }

    public static byte[] Data(Op op)
    {
        var data = new byte[op.Length];
        new Random(op.Seed).NextBytes(data);
        return data;
    }
}
