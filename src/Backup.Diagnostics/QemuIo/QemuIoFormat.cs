using System.Globalization;
using System.Text;

namespace Backup.Diagnostics.QemuIo;

/// <summary>qemu-io's printed forms: sizes (cvtstr), times (timestr), the I/O report and the -v hex dump.</summary>
internal static class QemuIoFormat
{
    private static readonly CultureInfo C = CultureInfo.InvariantCulture;

    /// <summary>cvtstr: "512 bytes", "64 KiB", "2.683 MiB"; a ".000" is cut wherever it first appears.</summary>
    public static string Size(double value)
    {
        string number;
        string suffix;
        if (value >= Unit(60))
        {
            (number, suffix) = (Fixed3(value / Unit(60)), " EiB");
        }
        else if (value >= Unit(50))
        {
            (number, suffix) = (Fixed3(value / Unit(50)), " PiB");
        }
        else if (value >= Unit(40))
        {
            (number, suffix) = (Fixed3(value / Unit(40)), " TiB");
        }
        else if (value >= Unit(30))
        {
            (number, suffix) = (Fixed3(value / Unit(30)), " GiB");
        }
        else if (value >= Unit(20))
        {
            (number, suffix) = (Fixed3(value / Unit(20)), " MiB");
        }
        else if (value >= Unit(10))
        {
            (number, suffix) = (Fixed3(value / Unit(10)), " KiB");
        }
        else
        {
            (number, suffix) = (CFloat(value, 6), " bytes");
        }
        var trim = number.IndexOf(".000", StringComparison.Ordinal);
        return (trim >= 0 ? number[..trim] : number) + suffix;
    }

    /// <summary>timestr: "00.00 sec" under a second, "H:MM:SS.ss" from a second on or with -C.</summary>
    public static string Time(TimeSpan elapsed, bool verbose)
    {
        var seconds = (long)Math.Floor(elapsed.TotalSeconds);
        var fraction = elapsed.TotalSeconds - seconds;
        if (verbose || seconds > 0)
        {
            return string.Create(C, $"{seconds / 3600}:{seconds % 3600 / 60:00}:{CFloat(seconds % 60 + fraction, 2).PadLeft(5, '0')}");
        }
        return CFloat(fraction, 2).PadLeft(5, '0') + " sec";
    }

    /// <summary>print_report: the two report lines, or the -C line.</summary>
    public static string Report(string op, TimeSpan elapsed, long offset, long count, long total, int ops, bool machine)
    {
        var secs = elapsed.TotalSeconds;
        if (machine)
        {
            return string.Create(C, $"{total},{ops},{Time(elapsed, true)},{CFloat(total / secs, 3)},{CFloat(ops / secs, 3)}\n");
        }
        return string.Create(C, $"{op} {total}/{count} bytes at offset {offset}\n") +
               string.Create(C, $"{Size(total)}, {ops} ops; {Time(elapsed, false)} ({Size(total / secs)}/sec and {CFloat(ops / secs, 4)} ops/sec)\n");
    }

    /// <summary>dump_buffer (read -v): 16 bytes a line, hex then the printable ASCII letters and digits.</summary>
    public static string Dump(ReadOnlySpan<byte> data, long offset)
    {
        var sb = new StringBuilder();
        for (var i = 0; i < data.Length; i += 16)
        {
            var line = data.Slice(i, Math.Min(16, data.Length - i));
            sb.Append(C, $"{offset + i:x8}:  ");
            foreach (var b in line)
            {
                sb.Append(C, $"{b:x2} ");
            }
            sb.Append(' ');
            foreach (var b in line)
            {
                sb.Append(char.IsAsciiLetterOrDigit((char)b) ? (char)b : '.');
            }
            sb.Append('\n');
        }
        return sb.ToString();
    }

    /// <summary>printf("%.Nf"), including C's "inf" for a rate over a zero time.</summary>
    private static string CFloat(double value, int decimals) =>
        double.IsPositiveInfinity(value) ? "inf" : double.IsNaN(value) ? "-nan" : value.ToString("F" + decimals.ToString(C), C);

    private static string Fixed3(double value) => CFloat(value, 3);

    private static double Unit(int shift) => 1L << shift;
}
