using System.Runtime.InteropServices;

namespace Backup.Block;

/// <summary>
/// A buffer whose start is aligned for O_DIRECT: a slice of a pinned managed array, so it needs no
/// unsafe code and works with every API that takes <see cref="Memory{T}"/>.
/// </summary>
public sealed class AlignedBuffer : IDisposable
{
    private readonly byte[] _array;

    public AlignedBuffer(int length, int alignment)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        if (alignment <= 0 || (alignment & (alignment - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(alignment), "must be a power of two");
        }
        _array = GC.AllocateUninitializedArray<byte>(length + alignment, pinned: true);
        var address = (long)Marshal.UnsafeAddrOfPinnedArrayElement(_array, 0);
        var skew = (int)(((alignment - (address & (alignment - 1))) & (alignment - 1)));
        Memory = _array.AsMemory(skew, length);
    }

    public Memory<byte> Memory { get; }

    public void Dispose()
    {
        // Pinned arrays live on the pinned object heap and are collected normally; nothing to free.
    }
}
