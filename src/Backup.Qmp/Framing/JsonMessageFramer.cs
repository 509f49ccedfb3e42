using System.Buffers;
using System.Text.Json;

namespace Backup.Qmp.Framing;

/// <summary>What the framer found at the front of the buffer.</summary>
public enum FrameKind
{
    /// <summary>Not enough bytes yet.</summary>
    Incomplete,
    /// <summary>One complete top-level JSON value.</summary>
    Message,
    /// <summary>Bytes that cannot start or continue JSON; the framer skipped to the next line.</summary>
    ParseError,
    /// <summary>A value longer than the limit; the framer skipped to the next line.</summary>
    TooLarge,
}

/// <summary>
/// Splits a byte stream into top-level JSON values the way QEMU's JSON streamer does: values may be
/// concatenated or separated by any whitespace, not only newlines. The scan resumes where it stopped
/// (Utf8JsonReader state is carried across reads), so a large message arriving in pieces is scanned
/// once. After an error, input is discarded up to the next newline, so one bad line costs one error
/// reply and the session goes on.
/// </summary>
public sealed class JsonMessageFramer(int maxMessageBytes, int maxDepth = 1024)
{
    private JsonReaderState _state = NewState(maxDepth);
    private long _scanned;
    private bool _inValue;
    private bool _skippingToNewline;

    public int MaxMessageBytes { get; } = maxMessageBytes;

    /// <summary>The error text for the last <see cref="FrameKind.ParseError"/> or <see cref="FrameKind.TooLarge"/>.</summary>
    public string LastError { get; private set; } = "";

    /// <summary>
    /// Looks for the next frame in <paramref name="buffer"/>. <paramref name="consumed"/> is how far the
    /// caller may release the buffer; <paramref name="examined"/> how far it was looked at. For a
    /// message, <paramref name="message"/> holds its bytes (valid until the buffer is advanced).
    /// </summary>
    public FrameKind TryRead(ReadOnlySequence<byte> buffer, out ReadOnlySequence<byte> message,
        out SequencePosition consumed, out SequencePosition examined)
    {
        message = default;
        if (_skippingToNewline)
        {
            var nl = buffer.PositionOf((byte)'\n');
            if (nl is null)
            {
                consumed = examined = buffer.End;
                return FrameKind.Incomplete;
            }
            buffer = buffer.Slice(buffer.GetPosition(1, nl.Value));
            _skippingToNewline = false;
        }

        var reader = new Utf8JsonReader(buffer.Slice(_scanned), isFinalBlock: false, _state);
        try
        {
            while (reader.Read())
            {
                if (reader.TokenType is JsonTokenType.StartObject or JsonTokenType.StartArray)
                {
                    _inValue = true;
                }
                if (reader.CurrentDepth == 0 && reader.TokenType is not (JsonTokenType.StartObject or JsonTokenType.StartArray or JsonTokenType.PropertyName))
                {
                    var end = _scanned + reader.BytesConsumed;
                    var start = SkipWhitespace(buffer);
                    message = buffer.Slice(start, end - start);
                    consumed = examined = buffer.GetPosition(end);
                    Reset();
                    return FrameKind.Message;
                }
            }
        }
        catch (JsonException e)
        {
            LastError = "JSON parse error, " + Describe(e, buffer.Slice(_scanned + reader.BytesConsumed));
            return Fail(buffer, out consumed, out examined, FrameKind.ParseError);
        }

        _scanned += reader.BytesConsumed;
        _state = reader.CurrentState;
        if (!_inValue && _scanned == buffer.Length)
        {
            // Only whitespace so far: let the caller drop it.
            Reset();
            consumed = examined = buffer.End;
            return FrameKind.Incomplete;
        }
        if (buffer.Length > MaxMessageBytes)
        {
            LastError = $"JSON parse error, message exceeds {MaxMessageBytes} bytes";
            return Fail(buffer, out consumed, out examined, FrameKind.TooLarge);
        }
        consumed = buffer.Start;
        examined = buffer.End;
        return FrameKind.Incomplete;
    }

    private static long SkipWhitespace(ReadOnlySequence<byte> buffer)
    {
        long i = 0;
        foreach (var segment in buffer)
        {
            foreach (var b in segment.Span)
            {
                if (b is not ((byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n'))
                {
                    return i;
                }
                i++;
            }
        }
        return i;
    }

    private FrameKind Fail(ReadOnlySequence<byte> buffer, out SequencePosition consumed, out SequencePosition examined, FrameKind kind)
    {
        Reset();
        // Drop the offending line; if its end has not arrived yet, keep dropping until it does.
        var nl = buffer.PositionOf((byte)'\n');
        if (nl is null)
        {
            _skippingToNewline = true;
            consumed = examined = buffer.End;
        }
        else
        {
            consumed = examined = buffer.GetPosition(1, nl.Value);
        }
        return kind;
    }

    private void Reset()
    {
        _state = NewState(maxDepth);
        _scanned = 0;
        _inValue = false;
    }

    private static JsonReaderState NewState(int maxDepth) =>
        new(new JsonReaderOptions { MaxDepth = maxDepth, CommentHandling = JsonCommentHandling.Disallow });

    /// <summary>A short reason in the spirit of QEMU's ("stray '-j'", "expecting value").</summary>
    private static string Describe(JsonException e, ReadOnlySequence<byte> rest)
    {
        if (e.Message.Contains("depth", StringComparison.OrdinalIgnoreCase))
        {
            return "too deeply nested";
        }
        var first = rest.IsEmpty ? (byte)0 : rest.FirstSpan.Length > 0 ? rest.FirstSpan[0] : (byte)0;
        return first switch
        {
            (byte)'}' or (byte)']' or (byte)',' or (byte)':' => "expecting value",
            0 => "expecting value",
            _ when first >= 0x80 => "invalid UTF-8 sequence in string",
            _ => $"stray '{(char)first}'",
        };
    }
}
