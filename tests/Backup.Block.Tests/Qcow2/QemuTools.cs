using System.Diagnostics;
using System.Text.Json;

namespace Backup.Block.Tests.Qcow2;

/// <summary>Runs qemu-img / qemu-io and fails the test with their output when they fail.</summary>
internal static class QemuTools
{
    public static (int ExitCode, string Output) Run(string tool, params string[] args)
    {
        var (code, stdout, stderr) = RunSplit(tool, args);
        return (code, stdout + stderr);
    }

    public static (int ExitCode, string Stdout, string Stderr) RunSplit(string tool, params string[] args)
    {
        var psi = new ProcessStartInfo(tool)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        Process p;
        try
        {
            p = Process.Start(psi)!;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"{tool} is not installed (apt-get install -y qemu-utils)", e);
        }
        using (p)
        {
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            p.WaitForExit();
            return (p.ExitCode, stdout.Result, stderr.Result);
        }
    }

    public static string Ok(string tool, params string[] args)
    {
        var (code, output) = Run(tool, args);
        if (code != 0)
        {
            throw new InvalidOperationException($"{tool} {string.Join(' ', args)} failed ({code}):\n{output}");
        }
        return output;
    }

    public static string Img(params string[] args) => Ok("qemu-img", args);

    /// <summary>qemu-io on a qcow2 image, one or more -c commands.</summary>
    public static string Io(string image, params string[] commands)
    {
        var args = new List<string> { "-f", "qcow2" };
        foreach (var c in commands)
        {
            args.Add("-c");
            args.Add(c);
        }
        args.Add(image);
        var output = Ok("qemu-io", [.. args]);
        if (output.Contains("error", StringComparison.OrdinalIgnoreCase) || output.Contains("failed", StringComparison.OrdinalIgnoreCase))
        {
            throw new InvalidOperationException($"qemu-io failed:\n{output}");
        }
        return output;
    }

    /// <summary>qemu-img check: returns the JSON report; fails on corruptions (leaks are fine).</summary>
    public static JsonElement CheckNoCorruption(string image)
    {
        var (code, output, stderr) = RunSplit("qemu-img", "check", "-U", "--output=json", "-f", "qcow2", image);
        // Exit codes: 0 clean, 3 leaks only; 2 corruptions, 1 check failed.
        code.Should().BeOneOf([0, 3], "qemu-img check must find no corruption:\n" + output + stderr);
        var json = JsonDocument.Parse(output).RootElement.Clone();
        if (json.TryGetProperty("corruptions", out var c))
        {
            c.GetInt32().Should().Be(0, output);
        }
        return json;
    }

    /// <summary>qemu-img check must be entirely clean: no corruption and no leaks.</summary>
    public static void CheckClean(string image)
    {
        // -U: some tests check an image a node still holds (flushed, quiet), as QEMU's iotests do.
        var (code, output) = Run("qemu-img", "check", "-U", "-f", "qcow2", image);
        code.Should().Be(0, "qemu-img check must be clean:\n" + output);
    }

    public static JsonElement Info(string image)
    {
        // -U (force share): tests look at images a node still holds, as QEMU's iotests do.
        var (code, output, stderr) = RunSplit("qemu-img", "info", "-U", "--output=json", image);
        code.Should().Be(0, stderr);
        return JsonDocument.Parse(output).RootElement.Clone();
    }

    public static byte[] ConvertToRaw(string image, string dir)
    {
        var raw = Path.Combine(dir, "converted-" + Guid.NewGuid().ToString("N") + ".raw");
        Img("convert", "-O", "raw", image, raw);
        var bytes = File.ReadAllBytes(raw);
        File.Delete(raw);
        return bytes;
    }
}

/// <summary>A temporary directory under the system temp path, deleted with everything in it.</summary>
internal sealed class TempDir : IDisposable
{
    public TempDir()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "backupd-qcow2-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string File(string name) => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

internal static class Qcow2Open
{
    public static BlockOptions Options(string path, bool readOnly = false, string nodeName = "img", object? backing = null,
        bool includeBacking = false, string? discard = null)
    {
        var o = new BlockOptions
        {
            ["driver"] = "qcow2",
            ["node-name"] = nodeName,
            ["read-only"] = readOnly,
            ["file"] = new BlockOptions { ["driver"] = "file", ["filename"] = path },
        };
        if (includeBacking)
        {
            o["backing"] = backing;
        }
        if (discard is not null)
        {
            o["discard"] = discard;
        }
        return o;
    }

    public static async Task<(BlockGraph Graph, BlockNode Node)> OpenAsync(string path, bool readOnly = false, string? discard = null)
    {
        var graph = BlockGraph.CreateDefault();
        var node = await graph.AddAsync(Options(path, readOnly, discard: discard));
        return (graph, node);
    }

    public static async Task<byte[]> ReadAllAsync(BlockNode node, int chunk = 1 << 20)
    {
        var data = new byte[node.Length];
        for (long off = 0; off < data.Length; off += chunk)
        {
            var n = (int)Math.Min(chunk, data.Length - off);
            await node.ReadAsync(off, data.AsMemory((int)off, n));
        }
        return data;
    }
}
