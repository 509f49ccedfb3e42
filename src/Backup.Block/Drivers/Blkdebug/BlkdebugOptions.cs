using System.Globalization;

namespace Backup.Block.Drivers.Blkdebug;

/// <summary>
/// The options of a blkdebug node (QAPI BlockdevOptionsBlkdebug) turned into rules and request limits,
/// with QEMU's checks and error texts (checked against qemu-storage-daemon 7.2).
/// </summary>
internal sealed class BlkdebugOptions
{
    public string? ConfigFile { get; private init; }

    public IReadOnlyList<BlkdebugRule> Rules { get; private init; } = [];

    /// <summary>Request alignment (QEMU's request_alignment); 1 when not given.</summary>
    public long Align { get; private init; } = 1;

    public long MaxTransfer { get; private init; }

    public long OptWriteZero { get; private init; }

    public long MaxWriteZero { get; private init; }

    public long OptDiscard { get; private init; }

    public long MaxDiscard { get; private init; }

    /// <summary>Permissions the filter takes on its child in addition to the filter defaults (recorded; no permission model yet).</summary>
    public IReadOnlyList<string> TakeChildPerms { get; private init; } = [];

    /// <summary>Permissions the filter does not share on its child (recorded; no permission model yet).</summary>
    public IReadOnlyList<string> UnshareChildPerms { get; private init; } = [];

    /// <summary>True when only <c>config</c> and <c>image</c> shape the node: QEMU then names it <c>blkdebug:CONFIG:IMAGE</c>.</summary>
    public bool HasOnlyConfig { get; private init; }

    private static readonly string[] DriverKeys =
        ["align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard", "inject-error", "set-state",
         "take-child-perms", "unshare-child-perms"];

    public static BlkdebugOptions Parse(BlockOptions options, Func<string, string> readConfigFile)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentNullException.ThrowIfNull(readConfigFile);
        var align = Size(options, "align", int32: false);
        var maxTransfer = Size(options, "max-transfer", int32: true);
        var optWriteZero = Size(options, "opt-write-zero", int32: true);
        var maxWriteZero = Size(options, "max-write-zero", int32: true);
        var optDiscard = Size(options, "opt-discard", int32: true);
        var maxDiscard = Size(options, "max-discard", int32: true);

        // Rules: the config file's sections, then the inline ones; all inject-error rules, then all set-state.
        var config = options.GetString("config");
        var injects = new List<Func<BlkdebugRule>>();
        var sets = new List<Func<BlkdebugRule>>();
        if (config is not null)
        {
            foreach (var section in BlkdebugConfigFile.Parse(readConfigFile(config)))
            {
                var values = new Dictionary<string, string>(StringComparer.Ordinal);
                foreach (var (key, value) in section.Values)
                {
                    values[key] = value; // QemuOpts: the last setting of a key wins
                }
                var typed = section.Group == "inject-error" ? InjectFromText(values) : SetStateFromText(values);
                (section.Group == "inject-error" ? injects : sets).Add(typed);
            }
        }
        foreach (var o in List(options, "inject-error"))
        {
            injects.Add(() => Inject(o.GetString("event"), o.GetInt64("state"), o.GetString("iotype"), o.GetInt64("errno"),
                o.GetInt64("sector"), o.GetBool("once"), o.GetBool("immediately")));
        }
        foreach (var o in List(options, "set-state"))
        {
            sets.Add(() => SetState(o.GetString("event"), o.GetInt64("state"), o.GetInt64("new_state")));
        }
        var rules = injects.Concat(sets).Select(make => make()).ToList();

        // Limits, as blkdebug_open checks them (the child's own alignment is 1 for our file nodes).
        if (align != 0 && (align >= int.MaxValue || (align & (align - 1)) != 0))
        {
            throw new BlockException($"Cannot meet constraints with align {align}");
        }
        var effectiveAlign = Math.Max(align, 1);
        CheckMultiple("max-transfer", maxTransfer, effectiveAlign);
        CheckMultiple("opt-write-zero", optWriteZero, effectiveAlign);
        CheckMultiple("max-write-zero", maxWriteZero, Math.Max(optWriteZero, effectiveAlign));
        CheckMultiple("opt-discard", optDiscard, effectiveAlign);
        CheckMultiple("max-discard", maxDiscard, Math.Max(optDiscard, effectiveAlign));

        return new BlkdebugOptions
        {
            ConfigFile = config,
            Rules = rules,
            Align = effectiveAlign,
            MaxTransfer = maxTransfer,
            OptWriteZero = optWriteZero,
            MaxWriteZero = maxWriteZero,
            OptDiscard = optDiscard,
            MaxDiscard = maxDiscard,
            TakeChildPerms = Strings(options, "take-child-perms"),
            UnshareChildPerms = Strings(options, "unshare-child-perms"),
            HasOnlyConfig = !DriverKeys.Any(options.Contains),
        };
    }

    private static long Size(BlockOptions options, string key, bool int32)
    {
        var v = options.GetInt64(key);
        if (v is null)
        {
            return 0;
        }
        if (v < 0)
        {
            throw new BlockException($"Parameter '{key}' expects a non-negative number below 2^64");
        }
        if (int32 && v > int.MaxValue)
        {
            throw new BlockException($"Parameter '{key}' expects int32_t");
        }
        return v.Value;
    }

    private static void CheckMultiple(string key, long value, long multiple)
    {
        if (value != 0 && (value >= int.MaxValue || value % multiple != 0))
        {
            throw new BlockException($"Cannot meet constraints with {key} {value}");
        }
    }

    private static IEnumerable<BlockOptions> List(BlockOptions options, string key) =>
        options[key] is IEnumerable<object?> list ? list.OfType<BlockOptions>() : [];

    private static List<string> Strings(BlockOptions options, string key) =>
        options[key] is IEnumerable<object?> list ? list.OfType<string>().ToList() : [];

    // QEMU keeps state, errno and new_state in C ints: larger numbers wrap.
    private static int CInt(long? v, int fallback) => v is null ? fallback : unchecked((int)v.Value);

    private static BlkdebugEvent Event(string? name)
    {
        if (name is null)
        {
            throw new BlockException("Missing event name for rule");
        }
        return BlkdebugEventNames.TryParse(name, out var ev) ? ev : throw new BlockException($"invalid parameter value: {name}");
    }

    internal static InjectErrorRule Inject(string? ev, long? state, string? iotype, long? errno, long? sector, bool? once, bool? immediately)
    {
        var e = Event(ev);
        var types = iotype switch
        {
            null => BlkdebugIoTypes.Default,
            "read" => BlkdebugIoTypes.Read,
            "write" => BlkdebugIoTypes.Write,
            "write-zeroes" => BlkdebugIoTypes.WriteZeroes,
            "discard" => BlkdebugIoTypes.Discard,
            "flush" => BlkdebugIoTypes.Flush,
            "block-status" => BlkdebugIoTypes.BlockStatus,
            _ => throw new BlockException($"invalid parameter value: {iotype}"),
        };
        var s = sector ?? -1;
        return new InjectErrorRule(e, CInt(state, 0), types, CInt(errno, 5), s == -1 ? -1 : unchecked(s * 512),
            once ?? false, immediately ?? false);
    }

    internal static SetStateRule SetState(string? ev, long? state, long? newState) =>
        new(Event(ev), CInt(state, 0), CInt(newState, 0));

    // Config-file values are text: numbers and booleans are parsed when the file is read (QEMU's
    // qemu_opt_set), events and iotypes when the rules are made (add_rule).
    private static Func<BlkdebugRule> InjectFromText(Dictionary<string, string> v)
    {
        var state = Number(v, "state");
        var errno = Number(v, "errno");
        var sector = Number(v, "sector");
        var once = Bool(v, "once");
        var immediately = Bool(v, "immediately");
        return () => Inject(v.GetValueOrDefault("event"), state, v.GetValueOrDefault("iotype"), errno, sector, once, immediately);
    }

    private static Func<BlkdebugRule> SetStateFromText(Dictionary<string, string> v)
    {
        var state = Number(v, "state");
        var newState = Number(v, "new_state");
        return () => SetState(v.GetValueOrDefault("event"), state, newState);
    }

    private static long? Number(Dictionary<string, string> v, string key)
    {
        if (!v.TryGetValue(key, out var text))
        {
            return null;
        }
        var t = text.Trim();
        var negative = t.StartsWith('-');
        var digits = negative ? t[1..] : t;
        ulong parsed;
        var ok = digits.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
            ? ulong.TryParse(digits.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out parsed)
            : ulong.TryParse(digits, NumberStyles.None, CultureInfo.InvariantCulture, out parsed);
        if (!ok || digits.Length == 0)
        {
            throw new BlockException($"Parameter '{key}' expects a number");
        }
        return negative ? -unchecked((long)parsed) : unchecked((long)parsed);
    }

    private static bool? Bool(Dictionary<string, string> v, string key)
    {
        if (!v.TryGetValue(key, out var text))
        {
            return null;
        }
        return text switch
        {
            "on" or "yes" or "true" or "y" => true,
            "off" or "no" or "false" or "n" => false,
            _ => throw new BlockException($"Parameter '{key}' expects 'on' or 'off'"),
        };
    }
}
