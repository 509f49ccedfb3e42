namespace Backup.Daemon;

/// <summary>
/// `backupd --help`: qemu-storage-daemon's options in its words, then backupd's own. A test checks that
/// every option the parser accepts is listed here.
/// </summary>
internal static class HelpText
{
    public const string Text = """
        Usage: backupd [options]
        backupd: incremental and differential backups of disk images, driven over QMP
        (the command line of qemu-storage-daemon 7.2)

          -h, --help             display this help and exit
          -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                                 accepted for compatibility: turns on the most
                                 verbose log (backupd has no QEMU trace points)
          -V, --version          output version information and exit

          (no options)           run on the embedded default: two demo disks in ./state
                                 (or $BACKUPD_STATE_DIR), QMP on state/qmp.sock

          --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
                     [,cache.direct=on|off][,cache.no-flush=on|off]
                     [,read-only=on|off][,auto-read-only=on|off]
                     [,force-share=on|off][,detect-zeroes=on|off|unmap]
                     [,driver specific parameters...]
                     or a JSON object (blockdev-add's arguments)
                                 configure a block backend

          --chardev socket,id=<id>,path=<path>,server=on[,wait=on|off]
          --chardev socket,id=<id>,host=<host>,port=<port>,server=on[,wait=on|off]
                   [,tls-creds=<id>[,tls-authz=<id>]]
          --chardev socket,id=<id>,fd=<fd>,server=on[,wait=on|off]
                   [,tls-creds=<id>[,tls-authz=<id>]]
                                 listen for QMP clients on a Unix socket, a TCP
                                 port, or a socket passed by the parent process
                                 (wait=on, the default: start-up waits for the
                                 first client); tls-creds names a
                                 tls-creds-x509 object: clients must use TLS
          --chardev socket,id=<id>,path=<path>
          --chardev socket,id=<id>,host=<host>,port=<port>
          --chardev socket,id=<id>,fd=<fd>
                                 connect to a QMP client that listens, or use a
                                 connected socket passed by the parent process

          --daemonize            daemonize the process, and have the parent exit
                                 once startup is complete

          --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
                   [,writable=on|off][,bitmap=<name>]
                   or a JSON object (block-export-add's arguments)
                                 export the specified block node over NBD
                                 (requires --nbd-server)

          --monitor [chardev=]name[,mode=control][,pretty=on|off]
                                 configure a QMP monitor

          --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
                       [,max-connections=<n>][,tls-creds=<id>[,tls-authz=<id>]]
          --nbd-server addr.type=unix,addr.path=<path>[,max-connections=<n>]
          --nbd-server addr.type=fd,addr.str=<fd>[,max-connections=<n>]
                       or a JSON object
                                 start an NBD server for exporting block nodes

          --object <type>[,<property>=<value>...]
                                 create a new object of type <type> (secret,
                                 tls-creds-x509, authz-simple, authz-list,
                                 authz-listfile); the 'id' property must be set

          --pidfile <path>       write process ID to a file after startup

        backupd's own options:
          --qmp unix:<path>      serve QMP on a Unix socket (repeatable)
          --qmp tcp:<host>:<port>
                                 serve QMP on TCP (port 0: any free port)
          --config <file>        read options from a JSON object, e.g.
                                 {"blockdev": [{...}], "qmp": ["unix:/run/b.sock"]}
          --qmp-max-sessions <n> QMP clients each monitor serves at once (default 128);
                                 more wait to be accepted until one leaves
          --log-file <path>      also write the log to <path>
          --log-level <level>    trace, debug, info, warning (default) or error
          --log-format text|json lines for people (default), or compact JSON
                                 (CLEF), one event per line

        """;
}
