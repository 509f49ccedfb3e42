using Backup.Block.Drivers.File;
using Backup.Block.Drivers.Raw;

namespace Backup.Block;

/// <summary>The drivers this assembly provides; a new driver is added here and in the schema.</summary>
public static class BuiltinDrivers
{
    public static IReadOnlyList<IBlockDriver> All { get; } =
    [
        new FileDriver(),
        new RawDriver(),
        new Drivers.Qcow2.Qcow2Driver(),
        new Drivers.Blkdebug.BlkdebugDriver(),
        new Drivers.CopyBeforeWrite.CopyBeforeWriteDriver(),
        new Drivers.SnapshotAccess.SnapshotAccessDriver(),
        Drivers.Null.NullDriver.Co,
        Drivers.Null.NullDriver.Aio,
        new Drivers.Nbd.NbdDriver(),
    ];
}
