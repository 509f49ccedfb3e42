using System.Text;
using System.Text.Json.Nodes;
using Backup.Qmp.Client;
using Library = Backup.Qmp.Client.QmpClient;

namespace Backup.IntegrationTests.Support;

/// <summary>
/// The tests' view of a QMP connection, on the project's client library (the one backupctl uses): whole
/// replies rather than exceptions, events as the messages the daemon sent, raw input and its replies for
/// the framing and hostile-input tests, and a default timeout on every wait.
/// </summary>
public sealed class QmpClient : IAsyncDisposable
{
    private static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(30);

    private readonly Library _client;

    private QmpClient(Library client) => _client = client;

    public JsonObject Greeting => _client.Greeting;

    /// <summary>Connects; a socket error (refused, backlog full) is thrown as the SocketException, which callers retry on.</summary>
    public static async Task<QmpClient> ConnectAsync(string path, bool negotiate = true)
    {
        try
        {
            return new(await Library.ConnectAsync(new QmpAddress.Unix(path), negotiate));
        }
        catch (QmpConnectionException e) when (e.InnerException is System.Net.Sockets.SocketException socketError)
        {
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(socketError);
            throw;
        }
    }

    /// <summary>The next reply to input sent with <see cref="SendRawAsync"/> (or to an unreadable line).</summary>
    public async Task<JsonObject> NextReplyAsync(TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? DefaultTimeout);
        return await _client.NextUnclaimedReplyAsync(cts.Token);
    }

    /// <summary>The next event since the connection was made, as the message the daemon sent.</summary>
    public async Task<JsonObject> NextEventAsync(TimeSpan? timeout = null)
    {
        using var cts = new CancellationTokenSource(timeout ?? DefaultTimeout);
        return (await _client.Events.NextAsync(cts.Token)).Message;
    }

    /// <summary>True when the daemon has closed the connection within <paramref name="timeout"/>.</summary>
    public async Task<bool> IsClosedAsync(TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (!_client.IsClosed)
        {
            if (DateTime.UtcNow >= deadline)
            {
                return false;
            }
            await Task.Delay(20);
        }
        return true;
    }

    public Task SendRawAsync(string text) => _client.SendRawAsync(Encoding.UTF8.GetBytes(text));

    /// <summary>Runs a command and returns the whole reply (<c>return</c> or <c>error</c>).</summary>
    public async Task<JsonObject> ExecuteAsync(string command, object? arguments = null)
    {
        var args = arguments is null ? null
            : arguments as JsonObject ?? JsonNode.Parse(System.Text.Json.JsonSerializer.Serialize(arguments))!.AsObject();
        using var cts = new CancellationTokenSource(DefaultTimeout);
        return await _client.ExecuteRawAsync(command, args, cts.Token);
    }

    public ValueTask DisposeAsync() => _client.DisposeAsync();
}
