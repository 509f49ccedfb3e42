namespace Backup.Block;

/// <summary>QEMU's id_wellformed: the one rule for node-names, job ids, export ids and object ids.</summary>
public static class Identifier
{
    /// <summary>A letter, then letters, digits, '-', '.' or '_'.</summary>
    public static bool IsWellFormed(string? id) =>
        !string.IsNullOrEmpty(id) && char.IsAsciiLetter(id[0]) &&
        id.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '.' or '_');
}
