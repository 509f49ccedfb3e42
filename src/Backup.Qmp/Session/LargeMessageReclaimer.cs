namespace Backup.Qmp.Session;

/// <summary>
/// Gives memory back after an unusually large request. Parsing a multi-megabyte message builds a tree
/// many times its size; the GC frees it, but keeps the pages committed for the next time, so one 10 MB
/// message with a million keys left the daemon 170 MB larger for good. After such a message, one
/// aggressive, compacting collection (which also decommits) runs a moment later, at most once per
/// <see cref="MinInterval"/> for the whole process, so a client sending nothing but huge messages
/// cannot turn it into a stream of full collections.
/// </summary>
public static class LargeMessageReclaimer
{
    /// <summary>Messages at least this large are followed by a collection.</summary>
    public const int Threshold = 1 << 20;

    public static readonly TimeSpan MinInterval = TimeSpan.FromSeconds(2);

    private static int s_pending;

    /// <summary>Notes that a message of <paramref name="bytes"/> was handled.</summary>
    public static void After(long bytes)
    {
        if (bytes < Threshold || Interlocked.Exchange(ref s_pending, 1) == 1)
        {
            return;
        }
        _ = CollectSoonAsync();
    }

    private static async Task CollectSoonAsync()
    {
        // Later than the reply, so that the request's tree is garbage by then; further big messages in
        // the meantime share this collection.
        await Task.Delay(TimeSpan.FromMilliseconds(200)).ConfigureAwait(false);
        GC.Collect(GC.MaxGeneration, GCCollectionMode.Aggressive, blocking: true, compacting: true);
        await Task.Delay(MinInterval).ConfigureAwait(false);
        Volatile.Write(ref s_pending, 0);
    }
}
