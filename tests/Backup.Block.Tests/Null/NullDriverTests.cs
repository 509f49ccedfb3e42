using Backup.Block.Drivers.Null;

namespace Backup.Block.Tests.Null;

public sealed class NullDriverTests : IAsyncLifetime
{
    private readonly BlockGraph _graph = BlockGraph.CreateDefault();

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _graph.CloseAllAsync();

    private ValueTask<BlockNode> AddAsync(string driver, string name, params (string Key, object Value)[] options)
    {
        var o = new BlockOptions { ["driver"] = driver, ["node-name"] = name };
        foreach (var (k, v) in options)
        {
            o[k] = v;
        }
        return _graph.AddAsync(o);
    }

    [Theory]
    [InlineData("null-co")]
    [InlineData("null-aio")]
    public async Task Defaults_are_QEMUs_one_GiB_and_the_short_filename(string driver)
    {
        var n = await AddAsync(driver, "n0", ("latency-ns", 10L));
        n.DriverName.Should().Be(driver);
        n.Length.Should().Be(1L << 30);
        n.Filename.Should().Be(driver + "://");
        var info = n.GetImageInfo();
        (info.Format, info.VirtualSize, info.ActualSize, info.DirtyFlag, info.ClusterSize).Should().Be((driver, 1L << 30, (long?)0, (bool?)null, (int?)null));
    }

    [Fact]
    public async Task Options_other_than_latency_give_QSDs_json_filename_and_size_counts_whole_sectors()
    {
        (await AddAsync("null-co", "a", ("size", 1000L))).Filename.Should().Be("json:{\"driver\": \"null-co\", \"size\": 1000}");
        (await AddAsync("null-co", "a2", ("size", 1000L))).Length.Should().Be(1024);
        (await AddAsync("null-aio", "b", ("size", 1048576L), ("read-zeroes", true), ("latency-ns", 5L))).Filename
            .Should().Be("json:{\"read-zeroes\": true, \"driver\": \"null-aio\", \"size\": 1048576}");
        (await AddAsync("null-co", "c", ("read-zeroes", false))).Filename.Should().Be("json:{\"read-zeroes\": false, \"driver\": \"null-co\"}");
        (await AddAsync("null-co", "d", ("size", 0L))).Length.Should().Be(0);
    }

    [Fact]
    public async Task Bad_options_are_refused_with_QEMUs_text()
    {
        await FluentActions.Awaiting(async () => await AddAsync("null-co", "x", ("latency-ns", -1L)))
            .Should().ThrowAsync<BlockException>().WithMessage("latency-ns is invalid");
        await FluentActions.Awaiting(async () => await AddAsync("null-co", "y", ("size", -1L)))
            .Should().ThrowAsync<BlockException>().WithMessage("Parameter 'size' expects a non-negative number below 2^64");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Writes_are_dropped_and_reads_never_show_old_buffer_contents(bool readZeroes)
    {
        var n = await AddAsync("null-co", "n", ("size", 1L << 20), ("read-zeroes", readZeroes));
        var data = new byte[65536];
        Array.Fill(data, (byte)0x55);
        await n.WriteAsync(0, data);
        await n.WriteZeroesAsync(65536, 65536);
        await n.FlushAsync();
        // A buffer that held someone else's data must come back zeroed (QEMU would leave it as is).
        var buffer = new byte[65536];
        Array.Fill(buffer, (byte)0xaa);
        await n.ReadAsync(0, buffer);
        buffer.Should().AllBeEquivalentTo((byte)0);
    }

    [Fact]
    public async Task Block_status_is_QEMUs_zero_and_allocated_only_with_read_zeroes()
    {
        var plain = await AddAsync("null-co", "p", ("size", 4L << 20));
        var zeroes = await AddAsync("null-aio", "z", ("size", 4L << 20), ("read-zeroes", true));
        // nbdinfo --map on QSD's exports: "hole" (neither data nor zero) and "hole,zero"; qemu-img map:
        // present false / present true zero true.
        (await plain.GetBlockStatusAsync(0, 4L << 20)).Should().Be(new BlockStatus(4L << 20, BlockStatusFlags.None, 0));
        (await zeroes.GetBlockStatusAsync(4096, 1L << 30)).Should()
            .Be(new BlockStatus((4L << 20) - 4096, BlockStatusFlags.Zero | BlockStatusFlags.Allocated, 1));
    }

    [Fact]
    public async Task Latency_delays_every_request()
    {
        var n = await AddAsync("null-co", "slow", ("size", 1L << 20), ("latency-ns", 50_000_000L));
        var sw = System.Diagnostics.Stopwatch.StartNew();
        await n.ReadAsync(0, new byte[512]);
        await n.WriteAsync(0, new byte[512]);
        sw.ElapsedMilliseconds.Should().BeGreaterThanOrEqualTo(90);
    }

    [Fact]
    public async Task Resize_is_refused_as_by_QEMUs_null_driver()
    {
        var n = await AddAsync("null-co", "n", ("size", 1L << 20));
        await FluentActions.Awaiting(async () => await n.TruncateAsync(2L << 20))
            .Should().ThrowAsync<BlockException>().WithMessage("Image format driver does not support resize");
        n.Length.Should().Be(1L << 20);
    }

    [Fact]
    public void Both_drivers_are_registered()
    {
        _graph.DriverNames.Should().Contain(["null-co", "null-aio"]);
        NullDriver.Co.Name.Should().Be("null-co");
    }
}
