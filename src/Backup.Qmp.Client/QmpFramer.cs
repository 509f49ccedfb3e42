using System.Buffers;
using System.Text.Json;

namespace Backup.Qmp.Client;

/// <summary>What <see cref="QmpFramer.TryRead"/> found at the front of the buffer.</summary>
public enum QmpFrame
{
    /// <summary>Not enough bytes yet: read more and call again with the whole buffer.</summary>
    Incomplete,
    /// <summary>One complete top-level JSON value.</summary>
    Message,
    /// <summary>Bytes that are not JSON; they were skipped up to and including the next newline.</summary>
    Garbage,
}

/// <summary>
/// Splits the bytes a QMP server sends into top-level JSON values. Output is one object per line, but
/// input is taken as it comes: values may be split anywhere, several may arrive in one read, and any
/// whitespace (CR LF included) may separate them. The scan resumes where it stopped, so a large reply
/// arriving in many pieces is scanned once. Not thread-safe: one framer per connection.
/// </summary>
public sealed class QmpFramer
{
    private static readonly JsonReaderOptions ReaderOptions = new() { MaxDepth = 1024 };
    private JsonReaderState _state = new(ReaderOptions);
    private long _scanned;
    private bool _skippingToNewline;

    /// <summary>The largest message accepted; past it the input is treated as garbage.</summary>
    public long MaxMessageBytes { get; init; } = 64L << 20;

    /// <summary>Why the last <see cref="QmpFrame.Garbage"/> was reported.</summary>
    public string LastError { get; private set; } = "";

    /// <summary>
    /// Looks for the next value at the front of <paramref name="buffer"/>. On <see cref="QmpFrame.Message"/>,
    /// <paramref name="message"/> is its bytes; <paramref name="consumed"/> is how far the caller may release
    /// the buffer and <paramref name="examined"/> how far it was looked at (PipeReader.AdvanceTo's pair).
    /// </summary>
    public QmpFrame TryRead(ReadOnlySequence<byte> buffer, out ReadOnlySequence<byte> message,
        out SequencePosition consumed, out SequencePosition examined)
    {
        message = default;
        if (_skippingToNewline)
        {
            var nl = buffer.PositionOf((byte)'\n');
            if (nl is null)
            {
                consumed = examined = buffer.End;
                return QmpFrame.Incomplete;
            }
            // The rest of a bad line, already reported: drop it and go on with what follows.
            _skippingToNewline = false;
            buffer = buffer.Slice(buffer.GetPosition(1, nl.Value));
        }

        var reader = new Utf8JsonReader(buffer.Slice(_scanned), isFinalBlock: false, _state);
        try
        {
            while (reader.Read())
            {
                // A top-level value ends at depth 0: the closing brace or bracket of a container,
                // or a scalar read on its own.
                if (reader.CurrentDepth == 0 && reader.TokenType is not (JsonTokenType.StartObject or JsonTokenType.StartArray or JsonTokenType.PropertyName))
                {
                    var end = buffer.GetPosition(_scanned + reader.BytesConsumed);
                    message = TrimLeadingWhitespace(buffer.Slice(0, end));
                    Reset();
                    consumed = examined = end;
                    return QmpFrame.Message;
                }
            }
        }
        catch (JsonException e)
        {
            return Skip(buffer, "JSON parse error: " + e.Message, out consumed, out examined);
        }

        _scanned += reader.BytesConsumed;
        _state = reader.CurrentState;
        if (buffer.Length > MaxMessageBytes)
        {
            return Skip(buffer, $"message longer than {MaxMessageBytes} bytes", out consumed, out examined);
        }
        // Nothing can be released while a value is open: its bytes are the message.
        consumed = buffer.Start;
        examined = buffer.End;
        return QmpFrame.Incomplete;
    }

    private QmpFrame Skip(ReadOnlySequence<byte> buffer, string why, out SequencePosition consumed, out SequencePosition examined)
    {
        LastError = why;
        Reset();
        var nl = buffer.PositionOf((byte)'\n');
        if (nl is null)
        {
            _skippingToNewline = true;
            consumed = examined = buffer.End;
            return QmpFrame.Garbage;
        }
        consumed = examined = buffer.GetPosition(1, nl.Value);
        return QmpFrame.Garbage;
    }

    private void Reset()
    {
        _state = new JsonReaderState(ReaderOptions);
        _scanned = 0;
    }

    private static ReadOnlySequence<byte> TrimLeadingWhitespace(ReadOnlySequence<byte> s)
    {
        var reader = new SequenceReader<byte>(s);
        reader.AdvancePastAny((byte)' ', (byte)'\t', (byte)'\r', (byte)'\n');
        return s.Slice(reader.Position);
    }
}
