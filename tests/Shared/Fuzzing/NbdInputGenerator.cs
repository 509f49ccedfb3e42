using System.Buffers.Binary;
using System.Text;
using Backup.Nbd.Protocol;

namespace Backup.Tests.Fuzzing;

/// <summary>
/// One seeded client stream for an NBD server: a handshake of random and real options (names, meta
/// contexts, lengths that lie), often NBD_OPT_GO on <c>export</c> and then requests of every type with
/// random flags, offsets and lengths, and a few flipped bits anywhere. Transmission is true when the
/// stream asks to enter transmission.
/// </summary>
internal static class NbdInputGenerator
{
    public static (byte[] Stream, bool Transmission) Generate(Random random, string export, int diskSize)
    {
        var ms = new MemoryStream();
        var be = new byte[8];
        void U16(ushort v) { BinaryPrimitives.WriteUInt16BigEndian(be, v); ms.Write(be, 0, 2); }
        void U32(uint v) { BinaryPrimitives.WriteUInt32BigEndian(be, v); ms.Write(be, 0, 4); }
        void U64(ulong v) { BinaryPrimitives.WriteUInt64BigEndian(be, v); ms.Write(be, 0, 8); }
        void Option(uint option, byte[] data)
        {
            U64(random.Next(20) == 0 ? (ulong)random.NextInt64() : NbdWire.IHAVEOPT);
            U32(option);
            U32(random.Next(20) == 0 ? (uint)random.Next() : (uint)data.Length);
            ms.Write(data);
        }
        byte[] Name(string name) => [.. BitConverter.IsLittleEndian ? BitConverter.GetBytes(BinaryPrimitives.ReverseEndianness(Encoding.UTF8.GetByteCount(name))) : [], .. Encoding.UTF8.GetBytes(name)];
        byte[] Junk(int max) { var b = new byte[random.Next(max)]; random.NextBytes(b); return b; }

        U32(random.Next(10) == 0 ? (uint)random.Next() : NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE | NbdWire.NBD_FLAG_C_NO_ZEROES);
        var options = random.Next(6);
        for (var i = 0; i < options; i++)
        {
            var option = (uint)random.Next(0, 13);
            byte[] data = random.Next(3) switch
            {
                0 => Junk(64),
                1 => [.. Name(random.Next(2) == 0 ? export : "nope"), 0, 0],
                _ => [.. Name(export), .. BitConverter.GetBytes(BinaryPrimitives.ReverseEndianness(1)), .. Name("base:allocation")],
            };
            Option(option, data);
        }
        var transmission = random.Next(2) == 0;
        if (transmission)
        {
            if (random.Next(2) == 0)
            {
                Option(NbdWire.NBD_OPT_STRUCTURED_REPLY, []);
            }
            Option(NbdWire.NBD_OPT_GO, [.. Name(export), 0, 0]);
            var requests = random.Next(12);
            for (var i = 0; i < requests; i++)
            {
                var type = (ushort)random.Next(0, 10);
                var length = (uint)(random.Next(4) switch { 0 => random.Next(), 1 => 0, _ => random.Next(1, 70_000) });
                U32(random.Next(30) == 0 ? (uint)random.Next() : NbdWire.NBD_REQUEST_MAGIC);
                U16((ushort)(random.Next(4) == 0 ? random.Next(0, 64) : 0));
                U16(type);
                U64((ulong)i);
                U64((ulong)(random.Next(3) == 0 ? random.NextInt64() : random.Next(0, diskSize)));
                U32(length);
                if (type == NbdWire.NBD_CMD_WRITE && random.Next(3) > 0)
                {
                    ms.Write(Junk((int)Math.Min(length, 70_000) + 1));
                }
            }
        }
        var bytes = ms.ToArray();
        // Mutate a few bytes of some streams, anywhere.
        if (random.Next(3) == 0 && bytes.Length > 0)
        {
            for (var i = random.Next(1, 4); i > 0; i--)
            {
                bytes[random.Next(bytes.Length)] ^= (byte)(1 << random.Next(8));
            }
        }
        return (bytes, transmission);
    }

}
