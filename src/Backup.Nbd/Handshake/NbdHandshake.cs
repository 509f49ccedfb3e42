using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Text;
using Backup.Block.Security;
using Backup.Nbd.Exports;
using Backup.Nbd.Protocol;
using Microsoft.Extensions.Logging;

namespace Backup.Nbd.Handshake;

/// <summary>Where the handshake finds exports by name (the server; a fake in tests).</summary>
internal interface INbdExportDirectory
{
    NbdExport? FindByName(string name);

    IReadOnlyList<NbdExport> ListExports();
}

/// <summary>What a successful handshake agreed on: the export, reply style, selected contexts and the flags sent.</summary>
internal sealed record HandshakeResult(NbdExport Export, bool StructuredReplies, IReadOnlyList<int> MetaContextIds, long Size, ushort TransmissionFlags);

/// <summary>
/// The server side of the fixed newstyle handshake (proto.md "Fixed newstyle negotiation").
///
/// State machine, in prose: the server sends NBDMAGIC, IHAVEOPT and its handshake flags
/// (FIXED_NEWSTYLE | NO_ZEROES); the client answers with its flags, and any flag we do not know ends
/// the connection. Then options repeat until one of them ends the phase:
/// <list type="bullet">
/// <item>NBD_OPT_EXPORT_NAME: the export is sent without reply framing and transmission starts; an
///   unknown name closes the connection (the only way to refuse it).</item>
/// <item>NBD_OPT_GO: like NBD_OPT_INFO (NBD_REP_INFO replies, then ACK), then transmission starts.</item>
/// <item>NBD_OPT_ABORT: ACK, then close.</item>
/// </list>
/// Every other option gets its replies and the loop continues; options we do not implement get
/// NBD_REP_ERR_UNSUP. Malformed options get NBD_REP_ERR_INVALID; their data is always consumed, so
/// the stream stays in sync. Only a broken framing (wrong magic, truncated stream) closes the connection.
///
/// With TLS (<c>tls</c> given, QEMU's nbd-server-start tls-creds), the client must send NBD_OPT_STARTTLS
/// first, as in QEMU's nbd/server.c: every other option gets NBD_REP_ERR_TLS_REQD (NBD_OPT_ABORT too,
/// then the connection closes), NBD_OPT_EXPORT_NAME and a client without fixed newstyle are dropped.
/// STARTTLS is acknowledged in plain text, then the TLS handshake runs (<see cref="TlsChannel"/>: the
/// client certificate, then tls-authz), and the rest of the negotiation and the transmission phase go
/// over TLS: <see cref="Input"/> and <see cref="Output"/> are then the TLS session's.
/// </summary>
internal sealed class NbdHandshake(INbdExportDirectory directory, PipeReader input, Stream output, ILogger logger, string client,
    TlsServerPolicy? tls = null, Func<Stream, PipeReader>? readerFor = null)
{
    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    private PipeReader _input = input;
    private Stream _output = output;
    private bool _tlsDone;

    /// <summary>Where the connection reads from now: the plain pipe, or the TLS session's after STARTTLS.</summary>
    public PipeReader Input => _input;

    /// <summary>Where the connection writes to (and reads large payloads from) now.</summary>
    public Stream Output => _output;

    /// <summary>The TLS session, once STARTTLS has succeeded.</summary>
    public Stream? TlsStream { get; private set; }

    private bool _fixedNewstyle;
    private bool _noZeroes;
    private bool _structured;
    private string? _metaExportName;
    private List<int> _metaContexts = [];

    /// <summary>Runs the handshake; null when it ended without an export (abort, refusal, disconnect).</summary>
    public async ValueTask<HandshakeResult?> RunAsync(CancellationToken cancellationToken)
    {
        var greeting = new byte[NbdServerGreeting.Size];
        new NbdServerGreeting(NbdWire.NBD_FLAG_FIXED_NEWSTYLE | NbdWire.NBD_FLAG_NO_ZEROES).WriteTo(greeting);
        await WriteAsync(greeting, cancellationToken).ConfigureAwait(false);

        var clientFlagsBytes = new byte[4];
        if (!await _input.ReadExactAsync(clientFlagsBytes, cancellationToken).ConfigureAwait(false))
        {
            return null;
        }
        var clientFlags = BinaryPrimitives.ReadUInt32BigEndian(clientFlagsBytes);
        if ((clientFlags & ~(NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE | NbdWire.NBD_FLAG_C_NO_ZEROES)) != 0)
        {
            logger.LogInformation("NBD client {Client}: unknown client flags 0x{Flags:x}, closing", client, clientFlags);
            return null;
        }
        _fixedNewstyle = (clientFlags & NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE) != 0;
        _noZeroes = (clientFlags & NbdWire.NBD_FLAG_C_NO_ZEROES) != 0;

        var headerBytes = new byte[NbdOptionHeader.Size];
        while (true)
        {
            if (!await _input.ReadExactAsync(headerBytes, cancellationToken).ConfigureAwait(false))
            {
                return null;
            }
            NbdOptionHeader.TryRead(headerBytes, out var header);
            if (header.Magic != NbdWire.IHAVEOPT)
            {
                logger.LogInformation("NBD client {Client}: bad option magic 0x{Magic:x}, closing", client, header.Magic);
                return null;
            }
            if (!_fixedNewstyle && (header.Option != NbdWire.NBD_OPT_EXPORT_NAME || tls is not null))
            {
                // Plain newstyle has no way to refuse an option but closing.
                return null;
            }
            if (header.Length > NbdWire.MaxOptionLength)
            {
                if (!await _input.SkipAsync(header.Length, cancellationToken).ConfigureAwait(false) ||
                    header.Option is NbdWire.NBD_OPT_EXPORT_NAME or NbdWire.NBD_OPT_ABORT)
                {
                    return null;
                }
                await ReplyErrorAsync(header.Option, NbdWire.NBD_REP_ERR_TOO_BIG, "option too large", cancellationToken).ConfigureAwait(false);
                continue;
            }
            var data = new byte[header.Length];
            if (!await _input.ReadExactAsync(data, cancellationToken).ConfigureAwait(false))
            {
                return null;
            }
            if (tls is not null && !_tlsDone)
            {
                switch (await BeforeTlsAsync(header.Option, data, cancellationToken).ConfigureAwait(false))
                {
                    case BeforeTls.Close:
                        return null;
                    case BeforeTls.Next:
                        continue;
                }
            }
            switch (header.Option)
            {
                case NbdWire.NBD_OPT_EXPORT_NAME:
                    return await ExportNameAsync(data, cancellationToken).ConfigureAwait(false);
                case NbdWire.NBD_OPT_ABORT:
                    await TryReplyAckAsync(header.Option, cancellationToken).ConfigureAwait(false);
                    return null;
                case NbdWire.NBD_OPT_LIST:
                    await ListAsync(data, cancellationToken).ConfigureAwait(false);
                    break;
                case NbdWire.NBD_OPT_STARTTLS:
                    await ReplyErrorAsync(header.Option, data.Length != 0 ? NbdWire.NBD_REP_ERR_INVALID : tls is not null ? NbdWire.NBD_REP_ERR_INVALID : NbdWire.NBD_REP_ERR_POLICY,
                        data.Length != 0 ? "option 'starttls' has unexpected length" : tls is not null ? "TLS already enabled" : "TLS not configured",
                        cancellationToken).ConfigureAwait(false);
                    break;
                case NbdWire.NBD_OPT_INFO:
                case NbdWire.NBD_OPT_GO:
                    var result = await InfoOrGoAsync(header.Option, data, cancellationToken).ConfigureAwait(false);
                    if (result is not null)
                    {
                        return result;
                    }
                    break;
                case NbdWire.NBD_OPT_STRUCTURED_REPLY:
                    await StructuredReplyAsync(data, cancellationToken).ConfigureAwait(false);
                    break;
                case NbdWire.NBD_OPT_LIST_META_CONTEXT:
                case NbdWire.NBD_OPT_SET_META_CONTEXT:
                    await MetaContextAsync(header.Option, data, cancellationToken).ConfigureAwait(false);
                    break;
                default:
                    await ReplyErrorAsync(header.Option, NbdWire.NBD_REP_ERR_UNSUP,
                        $"Unsupported option {header.Option} ({NbdWire.OptionName(header.Option)})", cancellationToken).ConfigureAwait(false);
                    break;
            }
        }
    }

    // ------------------------------------------------------------------ TLS

    private enum BeforeTls
    {
        /// <summary>TLS is now on: handle nothing more of this option.</summary>
        Next,

        /// <summary>Drop the connection.</summary>
        Close,
    }

    /// <summary>An option while TLS is required and not yet on (QEMU's nbd_negotiate_options, the TLS branch).</summary>
    private async ValueTask<BeforeTls> BeforeTlsAsync(uint option, byte[] data, CancellationToken cancellationToken)
    {
        switch (option)
        {
            case NbdWire.NBD_OPT_STARTTLS:
                if (data.Length != 0)
                {
                    // A client that cannot even start TLS correctly is dropped.
                    await ReplyErrorAsync(option, NbdWire.NBD_REP_ERR_INVALID, "option 'starttls' has unexpected length", cancellationToken).ConfigureAwait(false);
                    return BeforeTls.Close;
                }
                return await StartTlsAsync(cancellationToken).ConfigureAwait(false) ? BeforeTls.Next : BeforeTls.Close;
            case NbdWire.NBD_OPT_EXPORT_NAME:
                // No way to send an error for this option: the connection closes.
                logger.LogWarning("NBD client {Client}: option negotiation failed: Option 0x{Option:x} not permitted before TLS", client, option);
                return BeforeTls.Close;
            default:
                await ReplyErrorAsync(option, NbdWire.NBD_REP_ERR_TLS_REQD, $"Option 0x{option:x} not permitted before TLS", cancellationToken).ConfigureAwait(false);
                return option == NbdWire.NBD_OPT_ABORT ? BeforeTls.Close : BeforeTls.Next;
        }
    }

    private async ValueTask<bool> StartTlsAsync(CancellationToken cancellationToken)
    {
        await ReplyAsync(NbdWire.NBD_OPT_STARTTLS, NbdWire.NBD_REP_ACK, [], cancellationToken).ConfigureAwait(false);
        // The client may send nothing between STARTTLS and our reply; anything already buffered in the plain
        // pipe would be lost to the TLS layer, so such a client is dropped.
        if (_input.TryRead(out var pending))
        {
            var early = pending.Buffer.Length;
            _input.AdvanceTo(pending.Buffer.Start);
            if (early > 0 || pending.IsCompleted)
            {
                logger.LogWarning("NBD client {Client}: option negotiation failed: data sent before the NBD_OPT_STARTTLS reply", client);
                return false;
            }
        }
        await _input.CompleteAsync().ConfigureAwait(false);
        try
        {
            var ssl = await TlsChannel.AcceptAsync(_output, tls!, cancellationToken).ConfigureAwait(false);
            TlsStream = ssl;
            _output = ssl;
            _input = readerFor?.Invoke(ssl) ?? PipeReader.Create(ssl, new StreamPipeReaderOptions(leaveOpen: true));
            _tlsDone = true;
            logger.LogInformation("NBD client {Client}: TLS session established", client);
            return true;
        }
        catch (TlsException e)
        {
            // QSD prints "option negotiation failed: REASON" for a failed TLS handshake or a refused client.
            logger.LogWarning("NBD client {Client}: option negotiation failed: {Reason}", client, e.Message);
            _input = PipeReader.Create(Stream.Null);
            return false;
        }
    }

    // ------------------------------------------------------------------ options

    private async ValueTask<HandshakeResult?> ExportNameAsync(byte[] data, CancellationToken cancellationToken)
    {
        if (!TryDecode(data, out var name) || directory.FindByName(name) is not { } export)
        {
            logger.LogInformation("NBD client {Client}: NBD_OPT_EXPORT_NAME for unknown export, closing", client);
            return null;
        }
        var size = export.Node.Length;
        var flags = export.TransmissionFlags(_structured);
        var reply = new byte[NbdExportNameReply.MinSize + (_noZeroes ? 0 : NbdWire.ExportNameZeroPad)];
        new NbdExportNameReply((ulong)size, flags).WriteTo(reply);
        await WriteAsync(reply, cancellationToken).ConfigureAwait(false);
        return new HandshakeResult(export, _structured, MetaFor(name), size, flags);
    }

    private async ValueTask ListAsync(byte[] data, CancellationToken cancellationToken)
    {
        if (data.Length != 0)
        {
            await ReplyErrorAsync(NbdWire.NBD_OPT_LIST, NbdWire.NBD_REP_ERR_INVALID, "no payload expected", cancellationToken).ConfigureAwait(false);
            return;
        }
        foreach (var export in directory.ListExports())
        {
            var name = Encoding.UTF8.GetBytes(export.Name);
            var description = Encoding.UTF8.GetBytes(export.Description ?? "");
            var payload = new byte[4 + name.Length + description.Length];
            BinaryPrimitives.WriteUInt32BigEndian(payload, (uint)name.Length);
            name.CopyTo(payload, 4);
            description.CopyTo(payload, 4 + name.Length);
            await ReplyAsync(NbdWire.NBD_OPT_LIST, NbdWire.NBD_REP_SERVER, payload, cancellationToken).ConfigureAwait(false);
        }
        await ReplyAsync(NbdWire.NBD_OPT_LIST, NbdWire.NBD_REP_ACK, [], cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask<HandshakeResult?> InfoOrGoAsync(uint option, byte[] data, CancellationToken cancellationToken)
    {
        // C: 32 bits name length, name, 16 bits number of info requests, 16 bits each.
        if (!TryParseInfoRequest(data, out var name, out var requests))
        {
            await ReplyErrorAsync(option, NbdWire.NBD_REP_ERR_INVALID, "request data length is inconsistent", cancellationToken).ConfigureAwait(false);
            return null;
        }
        if (directory.FindByName(name) is not { } export)
        {
            await ReplyErrorAsync(option, NbdWire.NBD_REP_ERR_UNKNOWN, $"export '{name}' not present", cancellationToken).ConfigureAwait(false);
            return null;
        }
        var size = export.Node.Length;
        var flags = export.TransmissionFlags(_structured);
        if (requests.Contains(NbdWire.NBD_INFO_NAME))
        {
            var n = Encoding.UTF8.GetBytes(export.Name);
            var payload = new byte[2 + n.Length];
            BinaryPrimitives.WriteUInt16BigEndian(payload, NbdWire.NBD_INFO_NAME);
            n.CopyTo(payload, 2);
            await ReplyAsync(option, NbdWire.NBD_REP_INFO, payload, cancellationToken).ConfigureAwait(false);
        }
        if (requests.Contains(NbdWire.NBD_INFO_DESCRIPTION) && !string.IsNullOrEmpty(export.Description))
        {
            var d = Encoding.UTF8.GetBytes(export.Description);
            var payload = new byte[2 + d.Length];
            BinaryPrimitives.WriteUInt16BigEndian(payload, NbdWire.NBD_INFO_DESCRIPTION);
            d.CopyTo(payload, 2);
            await ReplyAsync(option, NbdWire.NBD_REP_INFO, payload, cancellationToken).ConfigureAwait(false);
        }
        // Block sizes are always sent: any alignment works (minimum 1), 4 KiB is preferred, 32 MiB is the payload limit.
        var blockSize = new byte[NbdInfoBlockSize.Size];
        new NbdInfoBlockSize(1, NbdWire.NBD_PREFERRED_BLOCK_SIZE, NbdWire.NBD_MAX_BUFFER_SIZE).WriteTo(blockSize);
        await ReplyAsync(option, NbdWire.NBD_REP_INFO, blockSize, cancellationToken).ConfigureAwait(false);
        var info = new byte[NbdInfoExport.Size];
        new NbdInfoExport((ulong)size, flags).WriteTo(info);
        await ReplyAsync(option, NbdWire.NBD_REP_INFO, info, cancellationToken).ConfigureAwait(false);
        await ReplyAsync(option, NbdWire.NBD_REP_ACK, [], cancellationToken).ConfigureAwait(false);
        return option == NbdWire.NBD_OPT_GO ? new HandshakeResult(export, _structured, MetaFor(name), size, flags) : null;
    }

    private async ValueTask StructuredReplyAsync(byte[] data, CancellationToken cancellationToken)
    {
        if (data.Length != 0)
        {
            await ReplyErrorAsync(NbdWire.NBD_OPT_STRUCTURED_REPLY, NbdWire.NBD_REP_ERR_INVALID, "no payload expected", cancellationToken).ConfigureAwait(false);
            return;
        }
        if (_structured)
        {
            await ReplyErrorAsync(NbdWire.NBD_OPT_STRUCTURED_REPLY, NbdWire.NBD_REP_ERR_INVALID, "structured reply already negotiated", cancellationToken).ConfigureAwait(false);
            return;
        }
        _structured = true;
        await ReplyAsync(NbdWire.NBD_OPT_STRUCTURED_REPLY, NbdWire.NBD_REP_ACK, [], cancellationToken).ConfigureAwait(false);
    }

    private async ValueTask MetaContextAsync(uint option, byte[] data, CancellationToken cancellationToken)
    {
        if (!_structured)
        {
            await ReplyErrorAsync(option, NbdWire.NBD_REP_ERR_INVALID, "request NBD_OPT_STRUCTURED_REPLY first", cancellationToken).ConfigureAwait(false);
            return;
        }
        // C: 32 bits export name length, name, 32 bits number of queries, then each: 32 bits length, query.
        if (!TryParseMetaRequest(data, out var name, out var queries, out var problem))
        {
            await ReplyErrorAsync(option, problem, "invalid meta context request", cancellationToken).ConfigureAwait(false);
            return;
        }
        if (directory.FindByName(name) is not { } export)
        {
            await ReplyErrorAsync(option, NbdWire.NBD_REP_ERR_UNKNOWN, $"export '{name}' not present", cancellationToken).ConfigureAwait(false);
            return;
        }
        var list = option == NbdWire.NBD_OPT_LIST_META_CONTEXT;
        var selected = new SortedSet<int>();
        if (list && queries.Count == 0)
        {
            for (var i = 0; i < export.Contexts.Count; i++)
            {
                selected.Add(i);
            }
        }
        foreach (var q in queries)
        {
            for (var i = 0; i < export.Contexts.Count; i++)
            {
                if (MetaContextQuery.Matches(q, export.Contexts[i].Name, list))
                {
                    selected.Add(i);
                }
            }
        }
        foreach (var id in selected)
        {
            var n = Encoding.UTF8.GetBytes(export.Contexts[id].Name);
            var payload = new byte[4 + n.Length];
            BinaryPrimitives.WriteUInt32BigEndian(payload, (uint)id);
            n.CopyTo(payload, 4);
            await ReplyAsync(option, NbdWire.NBD_REP_META_CONTEXT, payload, cancellationToken).ConfigureAwait(false);
        }
        if (!list)
        {
            // A SET replaces the previous selection, even when it selects nothing.
            _metaExportName = name;
            _metaContexts = [.. selected];
        }
        await ReplyAsync(option, NbdWire.NBD_REP_ACK, [], cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Contexts selected for <paramref name="exportName"/>; a SET for another export does not carry over.</summary>
    private List<int> MetaFor(string exportName) =>
        _structured && _metaExportName == exportName ? _metaContexts : [];

    // ------------------------------------------------------------------ parsing

    private static bool TryDecode(ReadOnlySpan<byte> bytes, out string value)
    {
        value = "";
        if (bytes.Length > NbdWire.NBD_MAX_STRING_SIZE)
        {
            return false;
        }
        try
        {
            value = StrictUtf8.GetString(bytes);
            return !value.Contains('\0', StringComparison.Ordinal);
        }
        catch (DecoderFallbackException)
        {
            return false;
        }
    }

    internal static bool TryParseInfoRequest(ReadOnlySpan<byte> data, out string name, out List<ushort> requests)
    {
        name = "";
        requests = [];
        if (data.Length < 6)
        {
            return false;
        }
        var nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > data.Length - 6 || !TryDecode(data.Slice(4, (int)nameLength), out name))
        {
            return false;
        }
        var rest = data[(4 + (int)nameLength)..];
        var count = BinaryPrimitives.ReadUInt16BigEndian(rest);
        if (rest.Length != 2 + count * 2)
        {
            return false;
        }
        for (var i = 0; i < count; i++)
        {
            requests.Add(BinaryPrimitives.ReadUInt16BigEndian(rest[(2 + i * 2)..]));
        }
        return true;
    }

    internal static bool TryParseMetaRequest(ReadOnlySpan<byte> data, out string name, out List<string> queries, out uint problem)
    {
        name = "";
        queries = [];
        problem = NbdWire.NBD_REP_ERR_INVALID;
        if (data.Length < 8)
        {
            return false;
        }
        var nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > data.Length - 8)
        {
            return false;
        }
        if (!TryDecode(data.Slice(4, (int)nameLength), out name))
        {
            return false;
        }
        var rest = data[(4 + (int)nameLength)..];
        var count = BinaryPrimitives.ReadUInt32BigEndian(rest);
        rest = rest[4..];
        for (var i = 0u; i < count; i++)
        {
            if (rest.Length < 4)
            {
                return false;
            }
            var len = BinaryPrimitives.ReadUInt32BigEndian(rest);
            if (len > rest.Length - 4)
            {
                return false;
            }
            if (len > NbdWire.NBD_MAX_STRING_SIZE)
            {
                problem = NbdWire.NBD_REP_ERR_TOO_BIG;
                return false;
            }
            if (!TryDecode(rest.Slice(4, (int)len), out var q))
            {
                return false;
            }
            queries.Add(q);
            rest = rest[(4 + (int)len)..];
        }
        return rest.IsEmpty;
    }

    // ------------------------------------------------------------------ replies

    private async ValueTask ReplyAsync(uint option, uint type, byte[] payload, CancellationToken cancellationToken)
    {
        var message = new byte[NbdOptionReplyHeader.Size + payload.Length];
        new NbdOptionReplyHeader(option, type, (uint)payload.Length).WriteTo(message);
        payload.CopyTo(message, NbdOptionReplyHeader.Size);
        await WriteAsync(message, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Error replies carry a human-readable message as their data (QEMU does the same).</summary>
    private ValueTask ReplyErrorAsync(uint option, uint error, string message, CancellationToken cancellationToken)
    {
        logger.LogDebug("NBD client {Client}: {Option} refused: {Message}", client, NbdWire.OptionName(option), message);
        return ReplyAsync(option, error, Encoding.UTF8.GetBytes(message), cancellationToken);
    }

    private async ValueTask TryReplyAckAsync(uint option, CancellationToken cancellationToken)
    {
        try
        {
            await ReplyAsync(option, NbdWire.NBD_REP_ACK, [], cancellationToken).ConfigureAwait(false);
        }
        catch (IOException)
        {
            // The client may already be gone after NBD_OPT_ABORT; that is its right.
        }
    }

    private async ValueTask WriteAsync(byte[] bytes, CancellationToken cancellationToken)
    {
        await _output.WriteAsync(bytes, cancellationToken).ConfigureAwait(false);
        await _output.FlushAsync(cancellationToken).ConfigureAwait(false);
    }
}

/// <summary>
/// Query matching for NBD_OPT_LIST/SET_META_CONTEXT (proto.md "Metadata querying", QEMU nbd.txt): a query
/// selects the context of the same name; in LIST only, "base:", "qemu:" and "qemu:dirty-bitmap:" select
/// every context under them.
/// </summary>
internal static class MetaContextQuery
{
    public static bool Matches(string query, string contextName, bool list)
    {
        if (query == contextName)
        {
            return true;
        }
        if (!list)
        {
            return false;
        }
        return query is "base:" or "qemu:" or NbdWire.QEMU_DIRTY_BITMAP_PREFIX &&
               contextName.StartsWith(query, StringComparison.Ordinal);
    }
}
