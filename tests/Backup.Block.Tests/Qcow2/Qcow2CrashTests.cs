using System.Diagnostics;
using Backup.Qcow2CrashWriter;

namespace Backup.Block.Tests.Qcow2;

/// <summary>
/// A child process writes to a qcow2 image through the driver and is killed with SIGKILL mid-storm.
/// Afterwards qemu-img check must find no corruption (leaks are allowed) and every write the child
/// acknowledged must read back. The assertions hold wherever the kill lands, so the test does not
/// depend on timing.
/// </summary>
public sealed class Qcow2CrashTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Theory]
    [InlineData(1, 65536, 150)]
    [InlineData(2, 4096, 300)]
    [InlineData(3, 512, 200)]
    [InlineData(4, 65536, 40)]
    public async Task Kill_9_mid_write_storm_loses_no_acknowledged_write_and_corrupts_nothing(int seed, int clusterSize, int killAfter)
    {
        const long Size = 32L << 20;
        var baseImg = _dir.File("base.qcow2");
        var top = _dir.File("top.qcow2");
        QemuTools.Img("create", "-q", "-f", "qcow2", baseImg, Size.ToString());
        QemuTools.Io(baseImg, "write -P 0x5a 0 8M", "write -P 0x6b 20M 4M");
        QemuTools.Img("create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", "-b", "base.qcow2", "-F", "qcow2", top);
        var model = QemuTools.ConvertToRaw(top, _dir.Path);

        var writer = Path.Combine(AppContext.BaseDirectory, "Backup.Qcow2CrashWriter.dll");
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        psi.ArgumentList.Add(writer);
        psi.ArgumentList.Add(top);
        psi.ArgumentList.Add(seed.ToString());
        using var timeout = new CancellationTokenSource(TimeSpan.FromMinutes(3));
        var lastAck = -1;
        using (var child = Process.Start(psi)!)
        {
            var stderr = child.StandardError.ReadToEndAsync(timeout.Token);
            try
            {
                while (lastAck < killAfter)
                {
                    var line = await child.StandardOutput.ReadLineAsync(timeout.Token);
                    if (line is null)
                    {
                        Assert.Fail("the writer exited early: " + await stderr);
                    }
                    lastAck = int.Parse(line!["ACK ".Length..]);
                }
            }
            finally
            {
                child.Kill(entireProcessTree: true); // SIGKILL: no close, no flush, no cleanup
                await child.WaitForExitAsync(timeout.Token);
            }
            // Acknowledgements already in the pipe count too.
            while (await child.StandardOutput.ReadLineAsync(timeout.Token) is { } line)
            {
                lastAck = int.Parse(line["ACK ".Length..]);
            }
        }

        QemuTools.CheckNoCorruption(top);

        CrashWorkload.Op inFlight = default;
        var index = 0;
        foreach (var op in CrashWorkload.Ops(seed, Size))
        {
            if (index++ > lastAck)
            {
                inFlight = op;
                break;
            }
            switch (op.Kind)
            {
                case CrashWorkload.Kind.Write:
                    CrashWorkload.Data(op).CopyTo(model, op.Offset);
                    break;
                case CrashWorkload.Kind.WriteZeroes:
                    Array.Clear(model, (int)op.Offset, op.Length);
                    break;
            }
        }
        var actual = QemuTools.ConvertToRaw(top, _dir.Path);
        actual.Length.Should().Be(model.Length);
        for (var i = 0; i < model.Length; i++)
        {
            // The request in flight at the kill may have landed, partly or not at all.
            if (actual[i] != model[i] && !(inFlight.Kind != CrashWorkload.Kind.Flush && i >= inFlight.Offset && i < inFlight.Offset + inFlight.Length))
            {
                Assert.Fail($"byte {i} reads {actual[i]:x2}, acknowledged data says {model[i]:x2} (last ack {lastAck})");
            }
        }

        // The image stays usable: open it again, write, close; nothing but the crash's leaks remains.
        var (graph, node) = await Qcow2Open.OpenAsync(top);
        try
        {
            await node.WriteAsync(12345, new byte[] { 9, 9, 9 });
        }
        finally
        {
            await graph.CloseAllAsync();
        }
        QemuTools.CheckNoCorruption(top);
        QemuTools.Io(top, "read -P 9 12345 3");
    }
}
