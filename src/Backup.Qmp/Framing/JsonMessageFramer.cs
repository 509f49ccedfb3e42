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
public sealed class JsonMessageFramer(int maxMessageBytes, int maxDepth = JsonMessageFramer.MaxNesting)
{
    /// <summary>QEMU's MAX_NESTING: objects and arrays open at once.</summary>
    public const int MaxNesting = 1024;

    /// <summary>QEMU's MAX_TOKEN_COUNT (2 Mi): tokens in one message, ':' and ',' included, counted as QEMU's lexer does.</summary>
    public const long MaxTokens = 2L << 20;

    /// <summary>QEMU's words for its own (64 MiB) limit on the bytes of one message.</summary>
    private const string TooLargeText = "JSON token size limit exceeded";

    private JsonReaderState _state = NewState(maxDepth);
    private long _scanned;
    private bool _inValue;
    private bool _skippingToNewline;
    private long _tokens;
    private JsonTokenType _previous;

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
                _tokens += QemuTokens(reader.TokenType, _previous, reader.CurrentDepth);
                _previous = reader.TokenType;
                if (_tokens > MaxTokens)
                {
                    LastError = "JSON token count limit exceeded";
                    return Fail(buffer, out consumed, out examined, FrameKind.TooLarge);
                }
                if (reader.TokenType is JsonTokenType.String or JsonTokenType.PropertyName && !IsValidUtf8(reader))
                {
                    // Utf8JsonReader leaves string contents unchecked until they are read as .NET strings.
                    LastError = "JSON parse error, invalid UTF-8 sequence in string";
                    return Fail(buffer, out consumed, out examined, FrameKind.ParseError);
                }
                if (reader.TokenType is JsonTokenType.String or JsonTokenType.PropertyName && reader.ValueIsEscaped
                    && LoneSurrogate(reader) is { } surrogate)
                {
                    // .NET reads "\udbff" without complaint and fails only when the string is used; QEMU refuses it here.
                    LastError = $"JSON parse error, \\u{surrogate} is not a valid Unicode character";
                    return Fail(buffer, out consumed, out examined, FrameKind.ParseError);
                }
                if (reader.CurrentDepth == 0 && reader.TokenType is not (JsonTokenType.StartObject or JsonTokenType.StartArray or JsonTokenType.PropertyName))
                {
                    var end = _scanned + reader.BytesConsumed;
                    var start = SkipWhitespace(buffer);
                    if (end - start > MaxMessageBytes)
                    {
                        // It arrived complete in one read, before the check for an unfinished one saw it.
                        LastError = TooLargeText;
                        return Fail(buffer, out consumed, out examined, FrameKind.TooLarge);
                    }
                    message = buffer.Slice(start, end - start);
                    consumed = examined = buffer.GetPosition(end);
                    Reset();
                    return FrameKind.Message;
                }
            }
        }
        catch (JsonException e)
        {
            // QEMU words its limits without the "JSON parse error, " of a syntax error.
            LastError = Describe(e, buffer.Slice(_scanned + reader.BytesConsumed)) is { } reason
                ? "JSON parse error, " + reason
                : "JSON nesting depth limit exceeded";
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
            LastError = TooLargeText;
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
        _tokens = 0;
        _previous = JsonTokenType.None;
    }

    /// <summary>
    /// How many of QEMU's tokens one reader token stands for: itself, the ':' after a member name, and the
    /// ',' before every element but the first of its container (counted with each element, taken back at
    /// the end of a non-empty container).
    /// </summary>
    private static int QemuTokens(JsonTokenType token, JsonTokenType previous, int depth)
    {
        switch (token)
        {
            case JsonTokenType.PropertyName:
                return 3;
            case JsonTokenType.EndObject or JsonTokenType.EndArray:
                return previous is JsonTokenType.StartObject or JsonTokenType.StartArray ? 1 : 0;
            default:
                // A value: a member's value has its ':' counted already; an array element brings its ','.
                var inArray = previous != JsonTokenType.PropertyName && depth > 0;
                return inArray ? 2 : 1;
        }
    }

    private static bool IsValidUtf8(Utf8JsonReader reader)
    {
        if (!reader.HasValueSequence)
        {
            return System.Text.Unicode.Utf8.IsValid(reader.ValueSpan);
        }
        // Only a string split across buffer segments: rare enough to copy.
        return System.Text.Unicode.Utf8.IsValid(reader.ValueSequence.ToArray());
    }

    /// <summary>The hex digits of the first \\uXXXX escape that is half a surrogate pair without its other half, if any.</summary>
    private static string? LoneSurrogate(Utf8JsonReader reader)
    {
        if (reader.HasValueSequence)
        {
            // Only an escaped string split across buffer segments: rare enough to copy.
            return LoneSurrogate(reader.ValueSequence.ToArray());
        }
        return LoneSurrogate(reader.ValueSpan);
    }

    private static string? LoneSurrogate(ReadOnlySpan<byte> raw)
    {
        for (var i = 0; i + 5 < raw.Length; i++)
        {
            if (raw[i] != (byte)'\\')
            {
                continue;
            }
            if (raw[i + 1] != (byte)'u')
            {
                i++; // an escaped character (possibly a backslash): skip it
                continue;
            }
            var unit = Hex4(raw.Slice(i + 2, 4));
            if (unit is >= 0xD800 and <= 0xDBFF)
            {
                var low = i + 11 < raw.Length && raw[i + 6] == (byte)'\\' && raw[i + 7] == (byte)'u' ? Hex4(raw.Slice(i + 8, 4)) : -1;
                if (low is >= 0xDC00 and <= 0xDFFF)
                {
                    i += 11;
                    continue;
                }
                return System.Text.Encoding.ASCII.GetString(raw.Slice(i + 2, 4));
            }
            if (unit is >= 0xDC00 and <= 0xDFFF)
            {
                return System.Text.Encoding.ASCII.GetString(raw.Slice(i + 2, 4));
            }
            i += 5;
        }
        return null;
    }

    private static int Hex4(ReadOnlySpan<byte> digits)
    {
        var value = 0;
        foreach (var d in digits)
        {
            var v = d switch
            {
                >= (byte)'0' and <= (byte)'9' => d - '0',
                >= (byte)'a' and <= (byte)'f' => d - 'a' + 10,
                >= (byte)'A' and <= (byte)'F' => d - 'A' + 10,
                _ => -1,
            };
            if (v < 0)
            {
                return -1;
            }
            value = value * 16 + v;
        }
        return value;
    }

    private static JsonReaderState NewState(int maxDepth) =>
        new(new JsonReaderOptions { MaxDepth = maxDepth, CommentHandling = JsonCommentHandling.Disallow });

    /// <summary>A short reason in the spirit of QEMU's ("stray '-j'", "expecting value").</summary>
    private static string? Describe(JsonException e, ReadOnlySequence<byte> rest)
    {
        if (e.Message.Contains("depth", StringComparison.OrdinalIgnoreCase))
        {
            return null;
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
