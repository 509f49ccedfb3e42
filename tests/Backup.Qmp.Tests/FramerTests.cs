using System.Buffers;
using System.Text;
using Backup.Qmp.Framing;

namespace Backup.Qmp.Tests;

public class FramerTests
{
    /// <summary>Feeds the input in pieces of <paramref name="chunk"/> bytes and collects what the framer reports.</summary>
    private static List<string> Frames(string input, int chunk, int max = 1 << 20)
    {
        var framer = new JsonMessageFramer(max);
        var bytes = Encoding.UTF8.GetBytes(input);
        var pending = new List<byte>();
        var result = new List<string>();
        for (var i = 0; i < bytes.Length; i += chunk)
        {
            pending.AddRange(bytes.Skip(i).Take(chunk));
            while (true)
            {
                var seq = new ReadOnlySequence<byte>(pending.ToArray());
                var kind = framer.TryRead(seq, out var msg, out var consumed, out _);
                var used = (int)seq.Slice(0, consumed).Length;
                if (kind == FrameKind.Message)
                {
                    result.Add(Encoding.UTF8.GetString(msg.ToArray()));
                }
                else if (kind != FrameKind.Incomplete)
                {
                    result.Add("ERR " + kind + ": " + framer.LastError);
                }
                pending.RemoveRange(0, used);
                if (kind == FrameKind.Incomplete)
                {
                    break;
                }
            }
        }
        return result;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(4096)]
    public void Splits_concatenated_values_however_they_arrive(int chunk)
    {
        Frames("{\"a\": [1, {\"b\": \"}\"}]}  {\"c\":2}\n\"s\"\n", chunk)
            .Should().Equal("{\"a\": [1, {\"b\": \"}\"}]}", "{\"c\":2}", "\"s\"");
    }

    [Fact]
    public void Skips_a_bad_line_and_goes_on()
    {
        Frames("{\"execute\": query-jobs}\n}\n{\"ok\":1}\n", 5).Should().Equal(
            "ERR ParseError: JSON parse error, stray 'q'",
            "ERR ParseError: JSON parse error, expecting value",
            "{\"ok\":1}");
    }

    [Fact]
    public void Refuses_an_oversized_message_without_keeping_it()
    {
        var big = "{\"x\": \"" + new string('a', 5000) + "\"}\n{\"ok\":1}\n";
        Frames(big, 256, max: 1024).Should().Equal("ERR TooLarge: JSON token size limit exceeded", "{\"ok\":1}");
    }

    [Fact]
    public void Refuses_nesting_beyond_the_limit()
    {
        var deep = new string('[', 2000) + new string(']', 2000) + "\n";
        Frames(deep, 512).Should().ContainSingle().Which.Should().StartWith("ERR ParseError");
    }
}
