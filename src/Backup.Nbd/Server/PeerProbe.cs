using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace Backup.Nbd.Server;

/// <summary>
/// Whether the peer of a connected socket has gone (closed, killed, reset), asked of the kernel without
/// reading: poll(2) with POLLRDHUP reports a peer that shut its side even while unread requests are
/// still queued, and it consumes nothing, so it cannot race with the connection's own reader.
/// </summary>
internal static partial class PeerProbe
{
    private const short POLLHUP = 0x010;
    private const short POLLERR = 0x008;
    private const short POLLNVAL = 0x020;
    private const short POLLRDHUP = 0x2000;

    [StructLayout(LayoutKind.Sequential)]
    private struct PollFd
    {
        public int Fd;
        public short Events;
        public short REvents;
    }

#pragma warning disable SYSLIB1054, CA5392 // a plain blittable signature; libc is resolved by the runtime
    [DllImport("libc", EntryPoint = "poll", SetLastError = true)]
    private static extern int Poll([In, Out] PollFd[] fds, nuint count, int timeout);
#pragma warning restore SYSLIB1054, CA5392

    /// <summary>True when the peer closed or reset the connection, or the socket is already closed here.</summary>
    public static bool PeerGone(Socket socket)
    {
        var handle = socket.SafeHandle;
        var added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            var fds = new[] { new PollFd { Fd = (int)handle.DangerousGetHandle(), Events = POLLRDHUP } };
            var n = Poll(fds, 1, 0);
            return n > 0 && (fds[0].REvents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
        }
        catch (ObjectDisposedException)
        {
            return true;
        }
        finally
        {
            if (added)
            {
                handle.DangerousRelease();
            }
        }
    }
}
