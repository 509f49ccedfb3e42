namespace Backup.Nbd.Tests.Fuzzing;

/// <summary>The fuzzers measure managed memory and a good client's latency: they run alone, not beside other test classes.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class FuzzCollection
{
    public const string Name = "fuzz";
}
