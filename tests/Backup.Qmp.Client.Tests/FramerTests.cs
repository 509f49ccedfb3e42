using System.Buffers;
using System.Text;
using Backup.Qmp.Client;

namespace Backup.Qmp.Client.Tests;

public class FramerTests
{
    /// <summary>Feeds <paramref name="chunks"/> one after another as a pipe would, and returns what came out.</summary>
    private static (List<string> Messages, int Garbage) Frame(params string[] chunks) =>
        Frame(chunks.Select(Encoding.UTF8.GetBytes).ToArray());

    private static (List<string> Messages, int Garbage) Frame(params byte[][] chunks)
    {
        var framer = new QmpFramer();
        var messages = new List<string>();
        var garbage = 0;
        var pending = Array.Empty<byte>();
        foreach (var chunk in chunks)
        {
            pending = [.. pending, .. chunk];
            var buffer = new ReadOnlySequence<byte>(pending);
            while (true)
            {
                var frame = framer.TryRead(buffer, out var message, out var consumed, out _);
                if (frame == QmpFrame.Incomplete)
                {
                    pending = buffer.Slice(consumed).ToArray();
                    break;
                }
                if (frame == QmpFrame.Message)
                {
                    messages.Add(Encoding.UTF8.GetString(message.ToArray()));
                }
                else
                {
                    garbage++;
                }
                buffer = buffer.Slice(consumed);
            }
        }
        return (messages, garbage);
    }

    [Fact]
    public void One_object_per_line()
    {
        var (m, g) = Frame("{\"return\": {}}\n{\"event\": \"X\"}\n");
        m.Should().Equal("{\"return\": {}}", "{\"event\": \"X\"}");
        g.Should().Be(0);
    }

    [Fact]
    public void Values_split_anywhere_and_concatenated()
    {
        var text = "{\"return\": {\"a\": [1, 2, {\"b\": \"}\"}]}}{\"return\":3}\r\n  {\"event\":\"E\",\"data\":{}}";
        for (var split = 1; split < text.Length; split++)
        {
            var (m, g) = Frame(text[..split], text[split..]);
            m.Should().Equal(["{\"return\": {\"a\": [1, 2, {\"b\": \"}\"}]}}", "{\"return\":3}", "{\"event\":\"E\",\"data\":{}}"], $"split at {split}");
            g.Should().Be(0);
        }
    }

    [Fact]
    public void Byte_by_byte()
    {
        var text = "{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n{\"return\": \"ünïcödé\"}\n";
        // Single bytes: the multi-byte UTF-8 characters arrive split too.
        var (m, _) = Frame(Encoding.UTF8.GetBytes(text).Select(b => new[] { b }).ToArray());
        m.Should().HaveCount(2);
        m[1].Should().Be("{\"return\": \"ünïcödé\"}");
    }

    [Fact]
    public void A_bad_line_is_skipped_and_the_next_one_read()
    {
        var (m, g) = Frame("this is not json\n{\"return\": {}}\n");
        m.Should().Equal("{\"return\": {}}");
        g.Should().Be(1);
    }

    [Fact]
    public void A_bad_line_split_before_its_newline_counts_once()
    {
        var (m, g) = Frame("garbage without", " its end yet", "\n{\"return\":", " 1}");
        m.Should().Equal("{\"return\": 1}");
        g.Should().Be(1);
    }

    [Fact]
    public void An_incomplete_value_waits()
    {
        var (m, g) = Frame("{\"return\": {\"a\": ");
        m.Should().BeEmpty();
        g.Should().Be(0);
    }

    [Fact]
    public void A_value_past_the_limit_is_garbage()
    {
        var framer = new QmpFramer { MaxMessageBytes = 16 };
        var bytes = Encoding.UTF8.GetBytes("{\"return\": \"" + new string('x', 40) + "\"}\n{\"return\":1}\n");
        var buffer = new ReadOnlySequence<byte>(bytes);
        framer.TryRead(buffer.Slice(0, 30), out _, out _, out _).Should().Be(QmpFrame.Garbage);
        framer.LastError.Should().Contain("longer than 16");
    }
}
