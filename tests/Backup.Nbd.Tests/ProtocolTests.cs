using System.Buffers.Binary;
using System.Text;
using Backup.Nbd.Protocol;
using Backup.Nbd.Tests.Support;

namespace Backup.Nbd.Tests;

/// <summary>Raw-socket exchanges with the server: handshake options, bad input and its errors, pipelining.</summary>
public sealed class ProtocolTests
{
    private const int Size = 1 << 20;

    private static async Task<(NbdFixture F, MemoryNode Node)> SetupAsync(bool writable = true, bool allocationDepth = false)
    {
        var f = NbdFixture.Create();
        var node = await f.AddMemoryNodeAsync("mem0", Size);
        f.Export("e0", "mem0", writable: writable, allocationDepth: allocationDepth, description: "memory disk");
        return (f, node);
    }

    // ------------------------------------------------------------------ handshake

    [Fact]
    public async Task Greeting_offers_fixed_newstyle_and_no_zeroes()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        (await c.ReadGreetingAsync()).Should().Be(NbdWire.NBD_FLAG_FIXED_NEWSTYLE | NbdWire.NBD_FLAG_NO_ZEROES);
    }

    [Fact]
    public async Task Unknown_client_flags_close_the_connection()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.StartAsync(NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE | 0x100);
        (await c.IsClosedByServerAsync()).Should().BeTrue();
    }

    [Fact]
    public async Task Unknown_option_gets_ERR_UNSUP_and_negotiation_goes_on()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.StartAsync();
        await c.SendOptionAsync(0x4242, [1, 2, 3]);
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_UNSUP);
        await c.SendOptionAsync(NbdWire.NBD_OPT_STARTTLS, []);
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_POLICY);
        await c.SendOptionAsync(NbdWire.NBD_OPT_LIST, [9]);
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_INVALID);

        await c.SendOptionAsync(NbdWire.NBD_OPT_LIST, []);
        var replies = await c.ReadOptionRepliesAsync();
        replies.Select(r => r.Header.ReplyType).Should().Equal(NbdWire.NBD_REP_SERVER, NbdWire.NBD_REP_ACK);
        var d = replies[0].Data;
        var nameLength = (int)BinaryPrimitives.ReadUInt32BigEndian(d);
        Encoding.UTF8.GetString(d, 4, nameLength).Should().Be("mem0");
        Encoding.UTF8.GetString(d, 4 + nameLength, d.Length - 4 - nameLength).Should().Be("memory disk");
    }

    [Fact]
    public async Task Oversized_option_is_skipped_with_ERR_TOO_BIG()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.StartAsync();
        await c.SendOptionAsync(NbdWire.NBD_OPT_INFO, new byte[NbdWire.MaxOptionLength + 1]);
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_TOO_BIG);
        var (size, _, _) = await c.HandshakeAsyncAfterStart("mem0");
        size.Should().Be(Size);
    }

    [Fact]
    public async Task Info_and_go_report_the_export_and_refuse_unknown_names()
    {
        var (f, _) = await SetupAsync(writable: false);
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.StartAsync();
        await c.SendOptionAsync(NbdWire.NBD_OPT_INFO, NbdTestClient.InfoRequest("nosuch"));
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_UNKNOWN);
        await c.SendOptionAsync(NbdWire.NBD_OPT_GO, NbdTestClient.InfoRequest("mem0", 1)[..^1]);
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_INVALID);

        await c.SendOptionAsync(NbdWire.NBD_OPT_INFO, NbdTestClient.InfoRequest("mem0", NbdWire.NBD_INFO_NAME, NbdWire.NBD_INFO_DESCRIPTION, NbdWire.NBD_INFO_BLOCK_SIZE));
        var replies = await c.ReadOptionRepliesAsync();
        var infos = replies.Where(r => r.Header.ReplyType == NbdWire.NBD_REP_INFO)
            .ToDictionary(r => BinaryPrimitives.ReadUInt16BigEndian(r.Data), r => r.Data[2..]);
        Encoding.UTF8.GetString(infos[NbdWire.NBD_INFO_NAME]).Should().Be("mem0");
        Encoding.UTF8.GetString(infos[NbdWire.NBD_INFO_DESCRIPTION]).Should().Be("memory disk");
        BinaryPrimitives.ReadUInt32BigEndian(infos[NbdWire.NBD_INFO_BLOCK_SIZE].AsSpan(8)).Should().Be(32u << 20);
        var flags = BinaryPrimitives.ReadUInt16BigEndian(infos[NbdWire.NBD_INFO_EXPORT].AsSpan(8));
        (flags & NbdWire.NBD_FLAG_READ_ONLY).Should().NotBe(0);
        (flags & NbdWire.NBD_FLAG_SEND_TRIM).Should().Be(0);
        (flags & NbdWire.NBD_FLAG_SEND_DF).Should().Be(0, "structured replies were not negotiated");
        replies[^1].Header.ReplyType.Should().Be(NbdWire.NBD_REP_ACK);

        // INFO did not end the handshake: GO still works.
        await c.SendOptionAsync(NbdWire.NBD_OPT_GO, NbdTestClient.InfoRequest("mem0"));
        (await c.ReadOptionRepliesAsync())[^1].Header.ReplyType.Should().Be(NbdWire.NBD_REP_ACK);
        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 512, 7);
        (await c.ReadSimpleReplyAsync(512)).Error.Should().Be(0);
    }

    [Fact]
    public async Task Export_name_option_sends_zero_padding_unless_no_zeroes()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        foreach (var noZeroes in new[] { true, false })
        {
            await using var c = await f.ConnectAsync();
            await c.StartAsync(NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? NbdWire.NBD_FLAG_C_NO_ZEROES : 0));
            await c.SendOptionAsync(NbdWire.NBD_OPT_EXPORT_NAME, Encoding.UTF8.GetBytes("mem0"));
            var reply = await c.ReadExactlyAsync(10 + (noZeroes ? 0 : 124));
            BinaryPrimitives.ReadUInt64BigEndian(reply).Should().Be(Size);
            await c.SendRequestAsync(NbdWire.NBD_CMD_FLUSH, 0, 0, 1);
            (await c.ReadSimpleReplyAsync()).Should().Be((0u, 1ul, Array.Empty<byte>()));
        }
        await using var bad = await f.ConnectAsync();
        await bad.StartAsync();
        await bad.SendOptionAsync(NbdWire.NBD_OPT_EXPORT_NAME, Encoding.UTF8.GetBytes("nosuch"));
        (await bad.IsClosedByServerAsync()).Should().BeTrue("the only way to refuse NBD_OPT_EXPORT_NAME is to close");
    }

    [Fact]
    public async Task Meta_contexts_need_structured_replies_and_are_listed_and_selected()
    {
        var (f, _) = await SetupAsync(allocationDepth: true);
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.StartAsync();
        await c.SendOptionAsync(NbdWire.NBD_OPT_SET_META_CONTEXT, NbdTestClient.MetaRequest("mem0", "base:allocation"));
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_INVALID);
        await c.NegotiateStructuredAsync();
        await c.SendOptionAsync(NbdWire.NBD_OPT_STRUCTURED_REPLY, []);
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_INVALID, "negotiated twice");

        async Task<List<string>> Contexts(uint option, params string[] queries)
        {
            await c.SendOptionAsync(option, NbdTestClient.MetaRequest("mem0", queries));
            var replies = await c.ReadOptionRepliesAsync();
            replies[^1].Header.ReplyType.Should().Be(NbdWire.NBD_REP_ACK);
            return replies.Where(r => r.Header.ReplyType == NbdWire.NBD_REP_META_CONTEXT)
                .Select(r => Encoding.UTF8.GetString(r.Data, 4, r.Data.Length - 4)).ToList();
        }

        (await Contexts(NbdWire.NBD_OPT_LIST_META_CONTEXT)).Should().Equal("base:allocation", "qemu:allocation-depth");
        (await Contexts(NbdWire.NBD_OPT_LIST_META_CONTEXT, "qemu:")).Should().Equal("qemu:allocation-depth");
        (await Contexts(NbdWire.NBD_OPT_LIST_META_CONTEXT, "qemu:dirty-bitmap:")).Should().BeEmpty();
        (await Contexts(NbdWire.NBD_OPT_SET_META_CONTEXT, "qemu:", "nosuch:x")).Should().BeEmpty("SET selects exact names only");
        (await Contexts(NbdWire.NBD_OPT_SET_META_CONTEXT, "base:allocation", "qemu:allocation-depth")).Should().HaveCount(2);

        await c.SendOptionAsync(NbdWire.NBD_OPT_LIST_META_CONTEXT, NbdTestClient.MetaRequest("nosuch"));
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_UNKNOWN);
        await c.SendOptionAsync(NbdWire.NBD_OPT_SET_META_CONTEXT, NbdTestClient.MetaRequest("mem0", "base:allocation")[..^2]);
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ERR_INVALID);
    }

    [Fact]
    public async Task Abort_is_acknowledged_then_the_server_closes()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.StartAsync();
        await c.SendOptionAsync(NbdWire.NBD_OPT_ABORT, []);
        (await c.ReadOptionReplyAsync()).Header.ReplyType.Should().Be(NbdWire.NBD_REP_ACK);
        (await c.IsClosedByServerAsync()).Should().BeTrue();
    }

    [Fact]
    public async Task Bad_option_magic_closes_the_connection()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.StartAsync();
        await c.SendOptionAsync(NbdWire.NBD_OPT_LIST, [], magic: 0x1234);
        (await c.IsClosedByServerAsync()).Should().BeTrue();
    }

    // ------------------------------------------------------------------ transmission: bad input

    [Theory]
    [InlineData(NbdWire.NBD_CMD_READ, Size - 512, 1024u, 0, NbdWire.NBD_EINVAL)]
    [InlineData(NbdWire.NBD_CMD_READ, 0, (32u << 20) + 1, 0, NbdWire.NBD_EINVAL)]
    [InlineData(NbdWire.NBD_CMD_WRITE_ZEROES, Size, 512u, 0, NbdWire.NBD_ENOSPC)]
    [InlineData(NbdWire.NBD_CMD_TRIM, Size + 1, 0u, 0, NbdWire.NBD_EINVAL)]
    [InlineData(NbdWire.NBD_CMD_CACHE, Size - 1, 2u, 0, NbdWire.NBD_EINVAL)]
    [InlineData(NbdWire.NBD_CMD_READ, 0, 512u, NbdWire.NBD_CMD_FLAG_REQ_ONE, NbdWire.NBD_EINVAL)]
    [InlineData(NbdWire.NBD_CMD_READ, 0, 512u, NbdWire.NBD_CMD_FLAG_DF, NbdWire.NBD_EINVAL)]
    [InlineData(NbdWire.NBD_CMD_FLUSH, 0, 0u, 0x8000, NbdWire.NBD_EINVAL)]
    [InlineData(42, 0, 0u, 0, NbdWire.NBD_EINVAL)]
    [InlineData(NbdWire.NBD_CMD_BLOCK_STATUS, 0, 512u, 0, NbdWire.NBD_EINVAL)]
    public async Task Invalid_requests_get_the_protocol_error_and_the_connection_goes_on(ushort type, long offset, uint length, ushort flags, uint error)
    {
        var (f, node) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        await c.SendRequestAsync(type, (ulong)offset, length, 0xfeed, flags);
        (await c.ReadSimpleReplyAsync()).Should().Be((error, 0xfeedul, Array.Empty<byte>()));
        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 4096, 2);
        (await c.ReadSimpleReplyAsync(4096)).Error.Should().Be(0);
        node.Data.Should().OnlyContain(b => b == 0);
    }

    [Fact]
    public async Task Writes_past_the_end_oversized_or_on_read_only_exports_fail_and_the_payload_is_skipped()
    {
        var (f, node) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        await c.SendRequestAsync(NbdWire.NBD_CMD_WRITE, Size - 512, 1024, 1, payload: Filled(1024, 0x11));
        (await c.ReadSimpleReplyAsync()).Error.Should().Be(NbdWire.NBD_ENOSPC);
        var big = (32 << 20) + 512;
        await c.SendRequestAsync(NbdWire.NBD_CMD_WRITE, 0, (uint)big, 2, payload: new byte[big]);
        (await c.ReadSimpleReplyAsync()).Error.Should().Be(NbdWire.NBD_EINVAL);
        await c.SendRequestAsync(NbdWire.NBD_CMD_WRITE, 0, 512, 3, flags: NbdWire.NBD_CMD_FLAG_NO_HOLE, payload: Filled(512, 0x22));
        (await c.ReadSimpleReplyAsync()).Error.Should().Be(NbdWire.NBD_EINVAL);
        await c.SendRequestAsync(NbdWire.NBD_CMD_WRITE, 4096, 512, 4, flags: NbdWire.NBD_CMD_FLAG_FUA, payload: Filled(512, 0x33));
        (await c.ReadSimpleReplyAsync()).Should().Be((0u, 4ul, Array.Empty<byte>()));
        node.Data.AsSpan(4096, 512).ToArray().Should().OnlyContain(b => b == 0x33);
        node.Data.Count(b => b != 0).Should().Be(512);

        var ro = await f.AddMemoryNodeAsync("ro", Size);
        f.Export("ero", "ro", writable: false);
        await using var r = await f.ConnectAsync();
        var (_, flags, _) = await r.HandshakeAsync("ro");
        (flags & NbdWire.NBD_FLAG_READ_ONLY).Should().NotBe(0);
        await r.SendRequestAsync(NbdWire.NBD_CMD_WRITE, 0, 512, 5, payload: Filled(512, 0x44));
        (await r.ReadSimpleReplyAsync()).Error.Should().Be(NbdWire.NBD_EPERM);
        await r.SendRequestAsync(NbdWire.NBD_CMD_TRIM, 0, 512, 6);
        (await r.ReadSimpleReplyAsync()).Error.Should().Be(NbdWire.NBD_EPERM);
        await r.SendRequestAsync(NbdWire.NBD_CMD_WRITE_ZEROES, 0, 512, 7);
        (await r.ReadSimpleReplyAsync()).Error.Should().Be(NbdWire.NBD_EPERM);
        await r.SendRequestAsync(NbdWire.NBD_CMD_FLUSH, 0, 0, 8);
        (await r.ReadSimpleReplyAsync()).Error.Should().Be(0);
        ro.Data.Should().OnlyContain(b => b == 0);
    }

    [Fact]
    public async Task Bad_request_magic_closes_the_connection()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 512, 1, magic: 0xdeadbeef);
        (await c.IsClosedByServerAsync()).Should().BeTrue();
    }

    [Fact]
    public async Task Disconnect_in_the_middle_of_a_write_payload_writes_nothing_and_the_server_keeps_serving()
    {
        var (f, node) = await SetupAsync();
        await using var _f = f;
        var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        var header = new byte[NbdRequest.Size];
        new NbdRequest(NbdWire.NBD_REQUEST_MAGIC, 0, NbdWire.NBD_CMD_WRITE, 1, 0, 65536).WriteTo(header);
        await c.WriteAsync([.. header, .. Filled(1000, 0x55)]);
        await Task.Delay(100);
        c.Abort();
        // Also a disconnect in the middle of a request header.
        var d = await f.ConnectAsync();
        await d.HandshakeAsync("mem0");
        await d.WriteAsync(header[..10]);
        d.Abort();

        await using var again = await f.ConnectAsync();
        await again.HandshakeAsync("mem0");
        await again.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 65536, 9);
        var (error, _, data) = await again.ReadSimpleReplyAsync(65536);
        error.Should().Be(0);
        data.Should().OnlyContain(b => b == 0);
        node.Data.Should().OnlyContain(b => b == 0);
        await c.DisposeAsync();
        await d.DisposeAsync();
    }

    [Fact]
    public async Task Node_errors_become_NBD_errors()
    {
        var (f, node) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        node.FailReads = new IOException("boom", 5);
        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 512, 1);
        (await c.ReadSimpleReplyAsync(512)).Error.Should().Be(NbdWire.NBD_EIO);
        node.FailWrites = new IOException("full", 28);
        await c.SendRequestAsync(NbdWire.NBD_CMD_WRITE, 0, 512, 2, payload: Filled(512, 1));
        (await c.ReadSimpleReplyAsync()).Error.Should().Be(NbdWire.NBD_ENOSPC);
        node.FailReads = null;
        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 512, 3);
        (await c.ReadSimpleReplyAsync(512)).Error.Should().Be(0);

        await using var s = await f.ConnectAsync();
        await s.HandshakeAsync("mem0", structured: true);
        node.Data[100] = 1; // data, not a hole: the read reaches the node
        node.FailReads = new IOException("boom", 5);
        await s.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 512, 4);
        var chunks = await s.ReadStructuredReplyAsync();
        chunks.Should().ContainSingle().Which.Header.Type.Should().Be(NbdWire.NBD_REPLY_TYPE_ERROR);
        NbdTestClient.ErrorOf(chunks).Should().Be(NbdWire.NBD_EIO);
    }

    // ------------------------------------------------------------------ transmission: structured replies

    [Fact]
    public async Task Structured_reads_send_holes_as_holes_unless_told_not_to_fragment()
    {
        var (f, node) = await SetupAsync();
        await using var _f = f;
        Filled(8192, 0x77).CopyTo(node.Data, 16384);
        await using var c = await f.ConnectAsync();
        var (_, flags, _) = await c.HandshakeAsync("mem0", structured: true);
        (flags & NbdWire.NBD_FLAG_SEND_DF).Should().NotBe(0);

        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 65536, 1);
        var chunks = await c.ReadStructuredReplyAsync();
        chunks.Select(ch => ch.Header.Type).Should().Equal(NbdWire.NBD_REPLY_TYPE_OFFSET_HOLE, NbdWire.NBD_REPLY_TYPE_OFFSET_DATA, NbdWire.NBD_REPLY_TYPE_OFFSET_HOLE);
        var image = Reassemble(chunks, 0, 65536);
        image.Should().Equal(node.Data[..65536]);

        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, 0, 65536, 2, NbdWire.NBD_CMD_FLAG_DF);
        chunks = await c.ReadStructuredReplyAsync();
        chunks.Should().ContainSingle().Which.Header.Type.Should().Be(NbdWire.NBD_REPLY_TYPE_OFFSET_DATA);
        Reassemble(chunks, 0, 65536).Should().Equal(node.Data[..65536]);

        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, 100, 0, 3);
        (await c.ReadStructuredReplyAsync()).Should().ContainSingle().Which.Header.Type.Should().Be(NbdWire.NBD_REPLY_TYPE_NONE);

        await c.SendRequestAsync(NbdWire.NBD_CMD_READ, Size, 1, 4);
        chunks = await c.ReadStructuredReplyAsync();
        NbdTestClient.ErrorOf(chunks).Should().Be(NbdWire.NBD_EINVAL);
    }

    [Fact]
    public async Task Block_status_reports_every_selected_context_and_honours_req_one()
    {
        var (f, node) = await SetupAsync(allocationDepth: true);
        await using var _f = f;
        Filled(8192, 0x77).CopyTo(node.Data, 16384);
        await using var c = await f.ConnectAsync();
        var (_, _, ids) = await c.HandshakeAsync("mem0", structured: true, "base:allocation", "qemu:allocation-depth");
        ids.Keys.Should().BeEquivalentTo("base:allocation", "qemu:allocation-depth");

        await c.SendRequestAsync(NbdWire.NBD_CMD_BLOCK_STATUS, 0, 65536, 1);
        var chunks = await c.ReadStructuredReplyAsync();
        chunks.Should().HaveCount(2).And.OnlyContain(ch => ch.Header.Type == NbdWire.NBD_REPLY_TYPE_BLOCK_STATUS);
        var byId = chunks.ToDictionary(ch => BinaryPrimitives.ReadUInt32BigEndian(ch.Payload), ch => Descriptors(ch.Payload));
        byId[ids["base:allocation"]].Should().Equal(
            (16384u, NbdWire.NBD_STATE_HOLE | NbdWire.NBD_STATE_ZERO), (8192u, 0u), (65536u - 24576, NbdWire.NBD_STATE_HOLE | NbdWire.NBD_STATE_ZERO));
        byId[ids["qemu:allocation-depth"]].Should().Equal((65536u, 1u));

        await c.SendRequestAsync(NbdWire.NBD_CMD_BLOCK_STATUS, 0, 65536, 2, NbdWire.NBD_CMD_FLAG_REQ_ONE);
        chunks = await c.ReadStructuredReplyAsync();
        chunks.Select(ch => Descriptors(ch.Payload).Count).Should().Equal(1, 1);
        Descriptors(chunks[0].Payload).Should().ContainSingle().Which.Should().Be((16384u, NbdWire.NBD_STATE_HOLE | NbdWire.NBD_STATE_ZERO));
    }

    [Fact]
    public async Task Pipelined_requests_all_get_their_replies()
    {
        var (f, node) = await SetupAsync();
        await using var _f = f;
        node.WriteDelay = TimeSpan.FromMilliseconds(20);
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        const int n = 64;
        var sends = new List<byte>();
        for (var i = 0; i < n; i++)
        {
            await c.SendRequestAsync(NbdWire.NBD_CMD_WRITE, (ulong)(i * 4096), 4096, (ulong)(1000 + i), payload: Filled(4096, (byte)(i + 1)));
        }
        await c.SendRequestAsync(NbdWire.NBD_CMD_FLUSH, 0, 0, 5000);
        var cookies = new List<ulong>();
        for (var i = 0; i <= n; i++)
        {
            var (error, cookie, _) = await c.ReadSimpleReplyAsync();
            error.Should().Be(0);
            cookies.Add(cookie);
        }
        cookies.Should().BeEquivalentTo(Enumerable.Range(1000, n).Select(i => (ulong)i).Append(5000ul));
        for (var i = 0; i < n; i++)
        {
            node.Data.AsSpan(i * 4096, 4096).ToArray().Should().OnlyContain(b => b == (byte)(i + 1));
        }
        node.Flushes.Should().BeGreaterThan(0);
    }

    [Fact]
    public async Task Disc_lets_outstanding_requests_finish_before_closing()
    {
        var (f, node) = await SetupAsync();
        await using var _f = f;
        node.WriteDelay = TimeSpan.FromMilliseconds(200);
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        await c.SendRequestAsync(NbdWire.NBD_CMD_WRITE, 0, 512, 1, payload: Filled(512, 0x99));
        await c.SendRequestAsync(NbdWire.NBD_CMD_DISC, 0, 0, 2);
        (await c.ReadSimpleReplyAsync()).Should().Be((0u, 1ul, Array.Empty<byte>()));
        (await c.IsClosedByServerAsync()).Should().BeTrue();
        node.Data[0].Should().Be(0x99);
    }

    // ------------------------------------------------------------------ export removal

    [Fact]
    public async Task Safe_removal_fails_while_connected_and_hard_removal_disconnects()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        var safe = async () => await f.Server.RemoveExportAsync("e0", hard: false);
        (await safe.Should().ThrowAsync<Backup.Block.BlockException>()).Which.Message.Should().Be("export 'e0' still in use");
        await f.Server.RemoveExportAsync("e0", hard: true);
        (await c.IsClosedByServerAsync()).Should().BeTrue();
        f.Events.DeletedExportIds.Should().Equal("e0");
        f.Server.Exports.Should().BeEmpty();
        await f.Graph.RemoveAsync("mem0");
    }

    [Fact]
    public async Task Stop_removes_exports_disconnects_clients_and_the_socket_file()
    {
        var (f, _) = await SetupAsync();
        await using var _f = f;
        await f.AddMemoryNodeAsync("mem1", 4096);
        f.Export("e1", "mem1");
        await using var c = await f.ConnectAsync();
        await c.HandshakeAsync("mem0");
        await using var pending = await f.ConnectAsync();
        await pending.StartAsync();
        File.Exists(f.SocketPath).Should().BeTrue();
        await f.Server.StopAsync();
        (await c.IsClosedByServerAsync()).Should().BeTrue();
        (await pending.IsClosedByServerAsync()).Should().BeTrue();
        f.Events.DeletedExportIds.Should().Equal("e0", "e1");
        File.Exists(f.SocketPath).Should().BeFalse();
        f.Server.IsRunning.Should().BeFalse();
        await f.Server.StopAsync(); // idempotent
    }

    // ------------------------------------------------------------------ helpers

    private static byte[] Filled(int n, byte value) => Enumerable.Repeat(value, n).ToArray();

    private static List<(uint Length, uint Flags)> Descriptors(byte[] payload)
    {
        var list = new List<(uint, uint)>();
        for (var i = 4; i < payload.Length; i += 8)
        {
            var d = NbdBlockDescriptor.Read(payload.AsSpan(i));
            list.Add((d.Length, d.StatusFlags));
        }
        return list;
    }

    private static byte[] Reassemble(List<(NbdStructuredReplyHeader Header, byte[] Payload)> chunks, long offset, int length)
    {
        var image = new byte[length];
        var covered = 0L;
        foreach (var (h, p) in chunks)
        {
            var o = (long)BinaryPrimitives.ReadUInt64BigEndian(p) - offset;
            if (h.Type == NbdWire.NBD_REPLY_TYPE_OFFSET_DATA)
            {
                p.AsSpan(8).CopyTo(image.AsSpan((int)o));
                covered += p.Length - 8;
            }
            else if (h.Type == NbdWire.NBD_REPLY_TYPE_OFFSET_HOLE)
            {
                covered += BinaryPrimitives.ReadUInt32BigEndian(p.AsSpan(8));
            }
        }
        covered.Should().Be(length, "the chunks must cover the whole read");
        return image;
    }
}
