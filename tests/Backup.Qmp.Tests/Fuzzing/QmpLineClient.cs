using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;

namespace Backup.Qmp.Tests.Fuzzing;

/// <summary>The client end for fuzzing: raw bytes out, reply lines in (each a JSON object, or the test fails).</summary>
internal sealed class QmpLineClient(Socket socket) : IDisposable
{
    private readonly byte[] _buffer = new byte[1 << 16];
    private readonly MemoryStream _pending = new();

    public async Task SendAsync(byte[] bytes)
    {
        var sent = 0;
        while (sent < bytes.Length)
        {
            sent += await socket.SendAsync(bytes.AsMemory(sent), SocketFlags.None).ConfigureAwait(false);
        }
    }

    /// <summary>The next reply line, or null if none arrived within <paramref name="timeout"/>.</summary>
    public async Task<string?> ReadLineAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        while (true)
        {
            var data = _pending.GetBuffer().AsSpan(0, (int)_pending.Length);
            var nl = data.IndexOf((byte)'\n');
            if (nl >= 0)
            {
                var line = Encoding.UTF8.GetString(data[..nl]).TrimEnd('\r');
                var rest = data[(nl + 1)..].ToArray();
                _pending.SetLength(0);
                _pending.Write(rest);
                return line;
            }
            int n;
            try
            {
                n = await socket.ReceiveAsync(_buffer, SocketFlags.None, cts.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return null;
            }
            if (n == 0)
            {
                throw new IOException("the session closed the connection");
            }
            _pending.Write(_buffer, 0, n);
        }
    }

    /// <summary>Reads replies until the one with <paramref name="id"/>; every line on the way must be a JSON object.</summary>
    public async Task<(JsonObject Reply, List<JsonObject> Before)> ReadUntilIdAsync(string id, TimeSpan timeout)
    {
        var before = new List<JsonObject>();
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var left = deadline - DateTime.UtcNow;
            var line = left > TimeSpan.Zero ? await ReadLineAsync(left).ConfigureAwait(false) : null;
            if (line is null)
            {
                throw new TimeoutException($"no reply with id {id} within {timeout}");
            }
            var reply = Parse(line) as JsonObject ?? throw new InvalidDataException("reply is not an object: " + line);
            if (reply["id"] is JsonValue v && v.TryGetValue<string>(out var s) && s == id)
            {
                return (reply, before);
            }
            before.Add(reply);
        }
    }

    /// <summary>Replies echo ids as deep as QMP allows, beyond System.Text.Json's default depth of 64.</summary>
    public static JsonNode? Parse(string line) => JsonNode.Parse(line, null, new System.Text.Json.JsonDocumentOptions { MaxDepth = 2048 });

    public void Dispose()
    {
        socket.Dispose();
        _pending.Dispose();
    }
}
