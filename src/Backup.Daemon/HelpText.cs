namespace Backup.Daemon;

internal static class HelpText
{
    public const string Text = """
        Usage: backupd [options]
        backupd: incremental and differential backups of disk images, driven over QMP

          -h, --help             display this help and exit
          -V, --version          output version information and exit

          (no options)           run on the embedded default: a demo disk in ./state
                                 (or $BACKUPD_STATE_DIR), QMP on state/qmp.sock

          --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
                     [,cache.direct=on|off][,cache.no-flush=on|off]
                     [,read-only=on|off][,detect-zeroes=on|off|unmap]
                     [,driver specific parameters...]
                     or a JSON object (blockdev-add's arguments)
                                 open a block node
          --chardev socket,id=<id>,path=<path>,server=on,wait=off
          --chardev socket,id=<id>,host=<host>,port=<port>,server=on,wait=off
                                 a socket to serve a QMP monitor on
          --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                                 serve QMP on a chardev (repeatable)
          --object [qom-type=]<type>,id=<id>[,...]
                                 create an object (e.g. secret)
          --pidfile <path>       write the process id to <path>
          --daemonize            run in the background; the parent exits once the
                                 daemon is ready

        backupd's own options:
          --qmp unix:<path>      serve QMP on a Unix socket (repeatable)
          --qmp tcp:<host>:<port>
                                 serve QMP on TCP (port 0: any free port)
          --config <file>        read options from a JSON object, e.g.
                                 {"blockdev": [{...}], "qmp": ["unix:/run/b.sock"]}
          --log-file <path>      also write the log to <path>
          --log-level <level>    trace, debug, info, warning (default) or error

        """;
}
