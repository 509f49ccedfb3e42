namespace Backup.Diagnostics.QemuIo;

/// <summary>Why <see cref="QemuNumbers.TryParseSize"/> refused a number: qemu-io's -EINVAL and -ERANGE.</summary>
internal enum SizeError
{
    None,
    /// <summary>Not a number, a negative number, a fraction without a suffix, or text after the number.</summary>
    Invalid,
    /// <summary>Larger than INT64_MAX.</summary>
    TooLarge,
}

/// <summary>
/// The number forms qemu-io (QEMU 7.2) accepts, with C's rules: qemu-io's cvtnum (qemu_strtosz with the
/// default suffix B, so a decimal or 0x-hex integer, a fraction only with a suffix, suffixes b/k/m/g/t/p/e
/// in powers of 1024) and strtol with base 0 for patterns and sleep times. Hex digits are never suffixes:
/// the integer is parsed first (as strtoull does), and only the character after it can be a suffix.
/// </summary>
internal static class QemuNumbers
{
    /// <summary>qemu-io's print_cvtnum_err: what it prints when a number is refused.</summary>
    public static string ErrorText(SizeError error, string argument) => error switch
    {
        SizeError.TooLarge => $"Parsing error: argument too large -- {argument}",
        _ => $"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {argument}",
    };

    /// <summary>
    /// qemu-io's cvtnum. <paramref name="hexWithSuffix"/> is true when a 0x number carried a suffix, which
    /// QEMU accepts with the warning "Using a multiplier suffix on hex numbers is deprecated".
    /// </summary>
    public static SizeError TryParseSize(string text, out long value, out bool hexWithSuffix)
    {
        ArgumentNullException.ThrowIfNull(text);
        value = 0;
        hexWithSuffix = false;
        // strtoull in base 10 first; a leading "0x" stops it at the 'x'.
        var (intVal, intEnd, overflow) = StrToU64(text, 0, 10);
        if (intEnd < 0)
        {
            return SizeError.Invalid;
        }
        var end = intEnd;
        var hex = false;
        double fraction = 0;
        if (overflow)
        {
            // -ERANGE, unless text follows the digits: then qemu_strtosz reports -EINVAL.
            return intEnd == text.Length ? SizeError.TooLarge : SizeError.Invalid;
        }
        if (text.AsSpan(0, intEnd).Contains('-'))
        {
            return SizeError.Invalid;
        }
        if (intVal == 0 && end < text.Length && text[end] is 'x' or 'X')
        {
            (intVal, end, overflow) = StrToU64(text, 0, 16);
            if (overflow)
            {
                return end == text.Length ? SizeError.TooLarge : SizeError.Invalid;
            }
            if (end < text.Length && text[end] == '.')
            {
                return SizeError.Invalid;
            }
            hex = true;
        }
        else if (end < text.Length && text[end] == '.')
        {
            // strtod on ".digits[e…]": an exponent makes the whole input invalid; "1.k" (no digits) is fine.
            var f = end + 1;
            while (f < text.Length && char.IsAsciiDigit(text[f]))
            {
                f++;
            }
            var digits = f - end - 1;
            if (digits == 0)
            {
                end++;
            }
            else
            {
                if (HasExponent(text, f))
                {
                    return SizeError.Invalid;
                }
                fraction = double.Parse(string.Concat("0", text.AsSpan(end, f - end)), System.Globalization.CultureInfo.InvariantCulture);
                end = f;
            }
        }
        var mul = end < text.Length ? SuffixMultiplier(text[end]) : -1;
        if (mul > 0)
        {
            hexWithSuffix = hex;
            end++;
        }
        else
        {
            mul = 1;
        }
        if (end != text.Length)
        {
            return SizeError.Invalid;
        }
        // The fraction as 64-bit fixed point, as QEMU keeps it.
        var valf = fraction == 0 ? 0UL : (ulong)(fraction * 18446744073709551616.0);
        ulong total;
        if (mul == 1)
        {
            if (valf != 0)
            {
                return SizeError.Invalid;
            }
            total = intVal;
        }
        else
        {
            // 64.64 fixed point times the multiplier, the fraction's half rounded upward.
            var fractionPart = (UInt128)valf * (ulong)mul;
            var whole = (UInt128)intVal * (ulong)mul + (fractionPart >> 64) + ((fractionPart >> 63) & 1);
            if (whole > ulong.MaxValue)
            {
                return SizeError.TooLarge;
            }
            total = (ulong)whole;
        }
        if (total > long.MaxValue)
        {
            return SizeError.TooLarge;
        }
        value = (long)total;
        return SizeError.None;
    }

    /// <summary>C's strtol(text, &amp;end, 0) followed by a check that nothing follows: parse_pattern, sleep.</summary>
    public static bool TryParseLong(string text, out long value)
    {
        ArgumentNullException.ThrowIfNull(text);
        var i = SkipSpace(text, 0);
        var negative = false;
        if (i < text.Length && text[i] is '+' or '-')
        {
            negative = text[i] == '-';
            i++;
        }
        var numberBase = 10;
        if (i < text.Length && text[i] == '0')
        {
            if (i + 2 < text.Length && text[i + 1] is 'x' or 'X' && IsDigit(text[i + 2], 16))
            {
                numberBase = 16;
                i += 2;
            }
            else
            {
                numberBase = 8;
            }
        }
        var start = i;
        UInt128 magnitude = 0;
        while (i < text.Length && IsDigit(text[i], numberBase))
        {
            magnitude = UInt128.Min(magnitude * (uint)numberBase + (uint)DigitValue(text[i]), (UInt128)ulong.MaxValue + 1);
            i++;
        }
        if (i == start)
        {
            // No digits: strtol returns 0 with end at the start of the text.
            value = 0;
            return text.Length == 0;
        }
        // Out-of-range values saturate to LONG_MIN/LONG_MAX, as strtol does with ERANGE.
        value = negative
            ? (magnitude > (UInt128)long.MaxValue + 1 ? long.MinValue : (long)(0 - magnitude))
            : (magnitude > long.MaxValue ? long.MaxValue : (long)magnitude);
        return i == text.Length;
    }

    private static long SuffixMultiplier(char c) => char.ToUpperInvariant(c) switch
    {
        'B' => 1,
        'K' => 1L << 10,
        'M' => 1L << 20,
        'G' => 1L << 30,
        'T' => 1L << 40,
        'P' => 1L << 50,
        'E' => 1L << 60,
        _ => -1,
    };

    private static bool HasExponent(string text, int at)
    {
        if (at >= text.Length || text[at] is not ('e' or 'E'))
        {
            return false;
        }
        var i = at + 1;
        if (i < text.Length && text[i] is '+' or '-')
        {
            i++;
        }
        return i < text.Length && char.IsAsciiDigit(text[i]);
    }

    /// <summary>
    /// strtoull: leading white space, an optional sign, "0x" in base 16, digits. Returns the end (-1 when no
    /// digits) and whether the value overflowed (then it is ULLONG_MAX, as strtoull's ERANGE).
    /// </summary>
    private static (ulong Value, int End, bool Overflow) StrToU64(string text, int from, int numberBase)
    {
        var i = SkipSpace(text, from);
        var negative = false;
        if (i < text.Length && text[i] is '+' or '-')
        {
            negative = text[i] == '-';
            i++;
        }
        if (numberBase == 16 && i + 2 < text.Length && text[i] == '0' && text[i + 1] is 'x' or 'X' && IsDigit(text[i + 2], 16))
        {
            i += 2;
        }
        var start = i;
        ulong value = 0;
        var overflow = false;
        while (i < text.Length && IsDigit(text[i], numberBase))
        {
            var d = (ulong)DigitValue(text[i]);
            if (value > (ulong.MaxValue - d) / (ulong)numberBase)
            {
                overflow = true;
            }
            value = unchecked(value * (ulong)numberBase + d);
            i++;
        }
        if (i == start)
        {
            return (0, -1, false);
        }
        if (overflow)
        {
            return (ulong.MaxValue, i, true);
        }
        return (negative ? unchecked(0 - value) : value, i, false);
    }

    private static int SkipSpace(string text, int i)
    {
        while (i < text.Length && text[i] is ' ' or '\t' or '\n' or '\v' or '\f' or '\r')
        {
            i++;
        }
        return i;
    }

    private static bool IsDigit(char c, int numberBase) => numberBase switch
    {
        16 => char.IsAsciiHexDigit(c),
        8 => c is >= '0' and <= '7',
        _ => char.IsAsciiDigit(c),
    };

    private static int DigitValue(char c) =>
        char.IsAsciiDigit(c) ? c - '0' : char.ToLowerInvariant(c) - 'a' + 10;
}
