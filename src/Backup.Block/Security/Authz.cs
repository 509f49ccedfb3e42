using System.Text.Json;
using Backup.Block.Objects;

namespace Backup.Block.Security;

/// <summary>
/// An authorization object (QEMU's QAuthZ): decides whether an identity (for TLS, the client
/// certificate's distinguished name, see <see cref="DistinguishedName"/>) may go on.
/// </summary>
public abstract class Authz(string id)
{
    public string Id { get; } = id;

    public abstract bool IsAllowed(string identity);

    /// <summary>
    /// QEMU's qauthz_is_allowed_by_id: the object is looked up at each check, so an object deleted
    /// since refuses everyone. Throws <see cref="BlockException"/> with QEMU's words when it cannot decide.
    /// </summary>
    public static bool IsAllowedById(ObjectRegistry objects, string authzId, string identity)
    {
        ArgumentNullException.ThrowIfNull(objects);
        return objects.Find(authzId) switch
        {
            null => throw new BlockException($"Cannot find QAuthZ object ID {authzId}"),
            Authz a => a.IsAllowed(identity),
            _ => throw new BlockException($"Object '{authzId}' is not a QAuthZ subclass"),
        };
    }
}

/// <summary>authz-simple: exactly one identity is allowed.</summary>
public sealed class AuthzSimple(string id, string identity) : Authz(id)
{
    public string Identity { get; } = identity;

    public override bool IsAllowed(string identity) => string.Equals(identity, Identity, StringComparison.Ordinal);
}

/// <summary>authz-list's policies (QAuthZListPolicy).</summary>
public enum AuthzPolicy
{
    Deny,
    Allow,
}

/// <summary>How a rule's match is compared (QAuthZListFormat): the exact string, or an fnmatch(3) glob.</summary>
public enum AuthzMatchFormat
{
    Exact,
    Glob,
}

/// <summary>One rule of an authz list (QAuthZListRule).</summary>
public sealed record AuthzRule(string Match, AuthzPolicy Policy, AuthzMatchFormat Format = AuthzMatchFormat.Exact)
{
    public bool Matches(string identity) => Format == AuthzMatchFormat.Glob
        ? Glob.Matches(Match, identity)
        : string.Equals(Match, identity, StringComparison.Ordinal);
}

/// <summary>authz-list: the first rule that matches decides; none matching, the list's policy (default deny).</summary>
public sealed class AuthzList(string id, AuthzPolicy policy, IReadOnlyList<AuthzRule> rules) : Authz(id)
{
    public AuthzPolicy Policy { get; } = policy;

    public IReadOnlyList<AuthzRule> Rules { get; } = rules;

    public override bool IsAllowed(string identity) => Decide(Policy, Rules, identity);

    internal static bool Decide(AuthzPolicy policy, IReadOnlyList<AuthzRule> rules, string identity)
    {
        foreach (var rule in rules)
        {
            if (rule.Matches(identity))
            {
                return rule.Policy == AuthzPolicy.Allow;
            }
        }
        return policy == AuthzPolicy.Allow;
    }
}

/// <summary>
/// authz-listfile: an authz list kept in a JSON file (<c>{"policy": "deny", "rules": [{"match": ...,
/// "policy": ..., "format": ...}]}</c>). With <c>refresh</c> (the default), a change of the file is
/// picked up at the next check; a file that no longer loads keeps the rules it had, as QEMU does.
/// </summary>
public sealed class AuthzListFile : Authz
{
    private readonly Lock _lock = new();
    private (AuthzPolicy Policy, IReadOnlyList<AuthzRule> Rules) _list;
    private (DateTime Modified, long Length) _stamp;

    private AuthzListFile(string id, string filename, bool refresh) : base(id)
    {
        Filename = filename;
        Refresh = refresh;
    }

    public string Filename { get; }

    public bool Refresh { get; }

    /// <summary>Reads the file now; QEMU's error when it cannot be read or parsed.</summary>
    public static AuthzListFile Load(string id, string filename, bool refresh)
    {
        var authz = new AuthzListFile(id, filename, refresh);
        authz._stamp = Stamp(filename);
        authz._list = Read(filename);
        return authz;
    }

    public override bool IsAllowed(string identity)
    {
        (AuthzPolicy Policy, IReadOnlyList<AuthzRule> Rules) list;
        lock (_lock)
        {
            if (Refresh && Stamp(Filename) is var stamp && stamp != _stamp)
            {
                _stamp = stamp;
                try
                {
                    _list = Read(Filename);
                }
                catch (BlockException)
                {
                    // QEMU keeps the rules it has when a reload fails.
                }
            }
            list = _list;
        }
        return AuthzList.Decide(list.Policy, list.Rules, identity);
    }

    private static (DateTime, long) Stamp(string filename)
    {
        var info = new FileInfo(filename);
        return info.Exists ? (info.LastWriteTimeUtc, info.Length) : (DateTime.MinValue, -1);
    }

    private static (AuthzPolicy, IReadOnlyList<AuthzRule>) Read(string filename)
    {
        byte[] bytes;
        try
        {
            bytes = File.ReadAllBytes(filename);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Unable to read '{filename}': {Posix.LibC.Describe(Posix.LibC.ErrnoOf(e))}");
        }
        try
        {
            using var doc = JsonDocument.Parse(bytes);
            var root = doc.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
            {
                throw new BlockException($"File '{filename}' must contain a JSON object");
            }
            var policy = root.TryGetProperty("policy", out var p) ? ParsePolicy(p, "policy") : AuthzPolicy.Deny;
            var rules = new List<AuthzRule>();
            if (root.TryGetProperty("rules", out var r))
            {
                if (r.ValueKind != JsonValueKind.Array)
                {
                    throw new BlockException("Invalid parameter type for 'rules', expected: array");
                }
                var i = 0;
                foreach (var rule in r.EnumerateArray())
                {
                    var at = $"rules[{i++}]";
                    if (rule.ValueKind != JsonValueKind.Object)
                    {
                        throw new BlockException($"Invalid parameter type for '{at}', expected: object");
                    }
                    var match = rule.TryGetProperty("match", out var m) && m.ValueKind == JsonValueKind.String
                        ? m.GetString()!
                        : throw new BlockException($"Parameter '{at}.match' is missing");
                    var rulePolicy = rule.TryGetProperty("policy", out var rp)
                        ? ParsePolicy(rp, at + ".policy")
                        : throw new BlockException($"Parameter '{at}.policy' is missing");
                    var format = AuthzMatchFormat.Exact;
                    if (rule.TryGetProperty("format", out var f))
                    {
                        format = f.ValueKind == JsonValueKind.String ? f.GetString() switch
                        {
                            "exact" => AuthzMatchFormat.Exact,
                            "glob" => AuthzMatchFormat.Glob,
                            var other => throw new BlockException($"Parameter '{at}.format' does not accept value '{other}'"),
                        } : throw new BlockException($"Invalid parameter type for '{at}.format', expected: string");
                    }
                    rules.Add(new AuthzRule(match, rulePolicy, format));
                }
            }
            return (policy, rules);
        }
        catch (JsonException)
        {
            throw new BlockException($"Unable to parse '{filename}': JSON parse error");
        }
    }

    private static AuthzPolicy ParsePolicy(JsonElement value, string name) => value.ValueKind == JsonValueKind.String
        ? value.GetString() switch
        {
            "deny" => AuthzPolicy.Deny,
            "allow" => AuthzPolicy.Allow,
            var other => throw new BlockException($"Parameter '{name}' does not accept value '{other}'"),
        }
        : throw new BlockException($"Invalid parameter type for '{name}', expected: string");
}

/// <summary>fnmatch(3) with no flags, as QEMU's glob rules use it: <c>*</c>, <c>?</c>, <c>[...]</c> (with <c>!</c> or <c>^</c>, ranges) and backslash escapes; <c>*</c> crosses '/'.</summary>
public static class Glob
{
    public static bool Matches(string pattern, string text)
    {
        ArgumentNullException.ThrowIfNull(pattern);
        ArgumentNullException.ThrowIfNull(text);
        int p = 0, t = 0, starP = -1, starT = 0;
        while (t < text.Length)
        {
            if (p < pattern.Length && pattern[p] == '*')
            {
                starP = ++p;
                starT = t;
                continue;
            }
            if (p < pattern.Length && MatchOne(pattern, p, text[t]) is { } next)
            {
                p = next;
                t++;
                continue;
            }
            if (starP < 0)
            {
                return false;
            }
            p = starP;
            t = ++starT;
        }
        while (p < pattern.Length && pattern[p] == '*')
        {
            p++;
        }
        return p == pattern.Length;
    }

    /// <summary>Whether the pattern element at <paramref name="p"/> matches <paramref name="c"/>; the index after it, or null.</summary>
    private static int? MatchOne(string pattern, int p, char c)
    {
        var ch = pattern[p];
        switch (ch)
        {
            case '?':
                return p + 1;
            case '\\' when p + 1 < pattern.Length:
                return pattern[p + 1] == c ? p + 2 : null;
            case '[':
                if (Bracket(pattern, p, c) is var (end, matched) && end > 0)
                {
                    return matched ? end : null;
                }
                // An unterminated '[' is an ordinary character.
                return c == '[' ? p + 1 : null;
            default:
                return ch == c ? p + 1 : null;
        }
    }

    private static (int End, bool Matched) Bracket(string pattern, int start, char c)
    {
        var i = start + 1;
        var negate = i < pattern.Length && pattern[i] is '!' or '^';
        if (negate)
        {
            i++;
        }
        var matched = false;
        var first = true;
        while (i < pattern.Length && (first || pattern[i] != ']'))
        {
            first = false;
            var lo = pattern[i];
            if (lo == '\\' && i + 1 < pattern.Length)
            {
                lo = pattern[++i];
            }
            i++;
            if (i + 1 < pattern.Length && pattern[i] == '-' && pattern[i + 1] != ']')
            {
                var hi = pattern[i + 1];
                if (hi == '\\' && i + 2 < pattern.Length)
                {
                    hi = pattern[i + 2];
                    i++;
                }
                i += 2;
                matched |= c >= lo && c <= hi;
            }
            else
            {
                matched |= c == lo;
            }
        }
        return i < pattern.Length ? (i + 1, matched != negate) : (0, false);
    }
}
