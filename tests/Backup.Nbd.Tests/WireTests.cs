using System.Buffers.Binary;
using System.IO.Pipelines;
using Backup.Block;
using Backup.Nbd.Exports;
using Backup.Nbd.Handshake;
using Backup.Nbd.Protocol;
using Backup.Nbd.Tests.Support;
using Backup.Nbd.Transmission;
using Microsoft.Extensions.Logging.Abstractions;

namespace Backup.Nbd.Tests;

/// <summary>Wire structs byte for byte, error mapping, and the handshake over in-memory pipes (no sockets).</summary>
public sealed class WireTests
{
    [Fact]
    public void Constants_are_the_spec_values()
    {
        NbdWire.NBDMAGIC.Should().Be(0x4e42444d41474943);
        NbdWire.IHAVEOPT.Should().Be(0x49484156454F5054);
        NbdWire.NBD_REP_MAGIC.Should().Be(0x3e889045565a9);
        NbdWire.NBD_REQUEST_MAGIC.Should().Be(0x25609513);
        NbdWire.NBD_SIMPLE_REPLY_MAGIC.Should().Be(0x67446698);
        NbdWire.NBD_STRUCTURED_REPLY_MAGIC.Should().Be(0x668e33ef);
        NbdWire.NBD_REP_ERR_UNSUP.Should().Be(0x80000001);
        NbdWire.NBD_REP_ERR_TOO_BIG.Should().Be(0x80000009);
        NbdWire.NBD_REPLY_TYPE_ERROR.Should().Be(32769);
        NbdWire.NBD_FLAG_SEND_FAST_ZERO.Should().Be(1 << 11);
    }

    [Fact]
    public void Request_round_trips_big_endian()
    {
        var r = new NbdRequest(NbdWire.NBD_REQUEST_MAGIC, NbdWire.NBD_CMD_FLAG_FUA, NbdWire.NBD_CMD_WRITE, 0x0102030405060708, 0x1000, 512);
        var b = new byte[NbdRequest.Size];
        r.WriteTo(b);
        Convert.ToHexString(b).Should().Be("25609513" + "0001" + "0001" + "0102030405060708" + "0000000000001000" + "00000200");
        NbdRequest.TryRead(b, out var back).Should().BeTrue();
        back.Should().Be(r);
        NbdRequest.TryRead(b.AsSpan(0, 27), out _).Should().BeFalse();
    }

    [Fact]
    public void Replies_and_chunks_have_the_spec_layout()
    {
        var b = new byte[NbdSimpleReply.Size];
        new NbdSimpleReply(NbdWire.NBD_EINVAL, 7).WriteTo(b);
        Convert.ToHexString(b).Should().Be("67446698" + "00000016" + "0000000000000007");

        var c = new byte[NbdStructuredReplyHeader.Size];
        new NbdStructuredReplyHeader(NbdWire.NBD_REPLY_FLAG_DONE, NbdWire.NBD_REPLY_TYPE_OFFSET_HOLE, 9, 12).WriteTo(c);
        Convert.ToHexString(c).Should().Be("668E33EF" + "0001" + "0002" + "0000000000000009" + "0000000C");

        var o = new byte[NbdOptionReplyHeader.Size];
        new NbdOptionReplyHeader(NbdWire.NBD_OPT_GO, NbdWire.NBD_REP_ACK, 0).WriteTo(o);
        Convert.ToHexString(o).Should().Be("0003E889045565A9" + "00000007" + "00000001" + "00000000");

        var i = new byte[NbdInfoExport.Size];
        new NbdInfoExport(1 << 20, 0x0d).WriteTo(i);
        Convert.ToHexString(i).Should().Be("0000" + "0000000000100000" + "000D");

        var chunk = NbdTransmission.BlockStatusChunk(5, 1, [new MetaExtent(4096, 3), new MetaExtent(1 << 20, 0)], 8192, 16, last: true);
        Convert.ToHexString(chunk).Should().Be("668E33EF00010005000000000000000500000014" + "00000001" + "00001000" + "00000003" + "00001000" + "00000000");
    }

    [Theory]
    [InlineData(28, NbdWire.NBD_ENOSPC)]
    [InlineData(122, NbdWire.NBD_ENOSPC)]
    [InlineData(30, NbdWire.NBD_EPERM)]
    [InlineData(95, NbdWire.NBD_ENOTSUP)]
    [InlineData(12, NbdWire.NBD_ENOMEM)]
    [InlineData(22, NbdWire.NBD_EINVAL)]
    [InlineData(5, NbdWire.NBD_EIO)]
    [InlineData(71, NbdWire.NBD_EIO)]
    public void Errno_maps_to_the_nearest_NBD_error(int errno, uint expected) =>
        NbdErrors.ToNbdError(new IOException("x", errno)).Should().Be(expected);

    [Fact]
    public void Exceptions_map_in_one_place()
    {
        NbdErrors.ToNbdError(new BlockReadOnlyException("n")).Should().Be(NbdWire.NBD_EPERM);
        NbdErrors.ToNbdError(new BlockRangeException("n", 0, 1, 0)).Should().Be(NbdWire.NBD_EINVAL);
        NbdErrors.ToNbdError(new OperationCanceledException()).Should().Be(NbdWire.NBD_ESHUTDOWN);
        NbdErrors.ToNbdError(new BlockException("wrapped", new IOException("x", 28))).Should().Be(NbdWire.NBD_ENOSPC);
        NbdErrors.ToNbdError(new InvalidOperationException()).Should().Be(NbdWire.NBD_EIO);
    }

    [Fact]
    public void Option_payload_parsers_reject_inconsistent_lengths()
    {
        NbdHandshake.TryParseInfoRequest(NbdTestClient.InfoRequest("abc", 1, 3), out var name, out var infos).Should().BeTrue();
        name.Should().Be("abc");
        infos.Should().Equal(1, 3);
        NbdHandshake.TryParseInfoRequest(NbdTestClient.InfoRequest("abc", 1).AsSpan(0, 10), out _, out _).Should().BeFalse();
        NbdHandshake.TryParseInfoRequest([0xff, 0xff, 0xff, 0xff, 0, 0], out _, out _).Should().BeFalse();
        NbdHandshake.TryParseMetaRequest(NbdTestClient.MetaRequest("e", "base:allocation", "qemu:"), out _, out var queries, out _).Should().BeTrue();
        queries.Should().Equal("base:allocation", "qemu:");
        NbdHandshake.TryParseMetaRequest([.. NbdTestClient.MetaRequest("e", "x"), 0], out _, out _, out _).Should().BeFalse();
        MetaContextQuery.Matches("qemu:", "qemu:allocation-depth", list: true).Should().BeTrue();
        MetaContextQuery.Matches("qemu:", "qemu:allocation-depth", list: false).Should().BeFalse();
        MetaContextQuery.Matches("qemu:dirty-bitmap:", "qemu:dirty-bitmap:b0", list: true).Should().BeTrue();
        MetaContextQuery.Matches("base:", "qemu:dirty-bitmap:b0", list: true).Should().BeFalse();
    }

    private sealed class Directory(params NbdExport[] exports) : INbdExportDirectory
    {
        public NbdExport? FindByName(string name) => exports.FirstOrDefault(e => e.Name == name);

        public IReadOnlyList<NbdExport> ListExports() => exports;
    }

    [Fact]
    public async Task Handshake_over_in_memory_pipes_negotiates_go_with_contexts()
    {
        var graph = new BlockGraph([new MemoryDriver()]);
        var node = await graph.AddAsync(new BlockOptions { ["driver"] = "memory", ["node-name"] = "m", ["size"] = 65536L });
        var export = new NbdExport(new NbdExportOptions { Id = "e", NodeName = "m", Writable = true }, "m", node,
            [new BaseAllocationContext(node), new AllocationDepthContext(node)], node.AddUser("test"), maxConnections: 0);

        var toServer = new Pipe();
        var toClient = new Pipe();
        var handshake = new NbdHandshake(new Directory(export), toServer.Reader, toClient.Writer.AsStream(), NullLogger.Instance, "pipe");
        var run = handshake.RunAsync(CancellationToken.None).AsTask();
        await using var client = new NbdTestClient(toClient.Reader.AsStream(), toServer.Writer.AsStream());
        var (size, flags, ids) = await client.HandshakeAsync("m", structured: true, "qemu:allocation-depth");
        var result = await run;

        size.Should().Be(65536);
        result.Should().NotBeNull();
        result!.StructuredReplies.Should().BeTrue();
        result.MetaContextIds.Should().Equal(1);
        ids.Should().Equal(new Dictionary<string, uint> { ["qemu:allocation-depth"] = 1 });
        flags.Should().Be(result.TransmissionFlags);
        ((int)flags).Should().Be(NbdWire.NBD_FLAG_HAS_FLAGS | NbdWire.NBD_FLAG_SEND_FLUSH | NbdWire.NBD_FLAG_SEND_FUA | NbdWire.NBD_FLAG_SEND_TRIM |
            NbdWire.NBD_FLAG_SEND_WRITE_ZEROES | NbdWire.NBD_FLAG_SEND_DF | NbdWire.NBD_FLAG_CAN_MULTI_CONN | NbdWire.NBD_FLAG_SEND_CACHE |
            NbdWire.NBD_FLAG_SEND_FAST_ZERO);
    }

    [Fact]
    public async Task Handshake_over_in_memory_pipes_ends_without_export_when_the_client_hangs_up()
    {
        var toServer = new Pipe();
        var toClient = new Pipe();
        var handshake = new NbdHandshake(new Directory(), toServer.Reader, toClient.Writer.AsStream(), NullLogger.Instance, "pipe");
        var run = handshake.RunAsync(CancellationToken.None).AsTask();
        var greeting = new byte[NbdServerGreeting.Size];
        await toClient.Reader.AsStream().ReadExactlyAsync(greeting);
        var flags = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(flags, NbdWire.NBD_FLAG_C_FIXED_NEWSTYLE);
        await toServer.Writer.WriteAsync(flags);
        await toServer.Writer.WriteAsync(new byte[7]); // half an option header
        await toServer.Writer.CompleteAsync();
        (await run).Should().BeNull();
    }
}
