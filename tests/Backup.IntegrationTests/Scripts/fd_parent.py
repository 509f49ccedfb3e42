"""A harness's parent process: passes sockets to the daemon as file descriptors (how iotest-style
suites avoid races on socket paths) and prints what it saw, one line per step, for the test to judge.

usage: fd_parent.py CASE DAEMON-COMMAND...   (the daemon's options are added here)
"""
import atexit, json, os, shutil, socket, subprocess, sys, tempfile

case, daemon = sys.argv[1], sys.argv[2:]
work = tempfile.mkdtemp(prefix="cli-fd-", dir="/tmp")
atexit.register(shutil.rmtree, work, True)
disk = os.path.join(work, "d.img")
with open(disk, "wb") as f:
    f.truncate(64 << 20)


def session(sock):
    """Greeting, negotiation, one query, quit; prints the replies' keys and the version seen."""
    f = sock.makefile("rwb")
    greeting = json.loads(f.readline())
    print("greeting", sorted(greeting["QMP"]))
    for command in ("qmp_capabilities", "query-version", "quit"):
        f.write(json.dumps({"execute": command}).encode() + b"\n")
        f.flush()
        reply = json.loads(f.readline())
        print(command, "return" if "return" in reply else reply)


def run(chardev, fds, extra=()):
    return subprocess.Popen(daemon + ["--chardev", chardev, "--monitor", "chardev=m", *extra], pass_fds=fds,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p):
    out, err = p.communicate(timeout=60)
    print("exit", p.returncode)
    for line in err.decode().splitlines():
        print("stderr", line)


if case == "listening":
    path = os.path.join(work, "l.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    p = run(f"socket,id=m,fd={listener.fileno()},server=on,wait=off", [listener.fileno()])
    listener.close()
    client = socket.socket(socket.AF_UNIX)
    client.connect(path)
    session(client)
    finish(p)
    print("socket file left", os.path.exists(path))
elif case == "bound-not-listening":
    # QEMU calls listen() on the descriptor itself.
    path = os.path.join(work, "b.sock")
    bound = socket.socket(socket.AF_UNIX)
    bound.bind(path)
    p = run(f"socket,id=m,fd={bound.fileno()},server=on,wait=off", [bound.fileno()])
    bound.close()
    client = socket.socket(socket.AF_UNIX)
    for _ in range(600):
        try:
            client.connect(path)
            break
        except ConnectionRefusedError:
            import time
            time.sleep(0.05)
    session(client)
    finish(p)
elif case == "socketpair":
    ours, theirs = socket.socketpair()
    p = run(f"socket,id=m,fd={theirs.fileno()}", [theirs.fileno()])
    theirs.close()
    session(ours)
    finish(p)
elif case == "client-mode":
    # iotests' QemuStorageDaemon(qmp=True): the harness listens, the daemon connects.
    path = os.path.join(work, "c.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    p = run(f"socket,id=m,path={path}", [])
    listener.settimeout(60)
    conn, _ = listener.accept()
    session(conn)
    finish(p)
elif case == "socketpair-server":
    ours, theirs = socket.socketpair()
    p = run(f"socket,id=m,fd={theirs.fileno()},server=on,wait=off", [theirs.fileno()])
    finish(p)
elif case == "not-a-socket":
    fd = os.open(disk, os.O_RDONLY)
    p = run(f"socket,id=m,fd={fd},server=on,wait=off", [fd])
    finish(p)
elif case == "closed-fd":
    p = run("socket,id=m,fd=77,server=on,wait=off", [])
    finish(p)
elif case == "fd-and-path":
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(work, "x.sock"))
    listener.listen()
    p = run(f"socket,id=m,fd={listener.fileno()},path={work}/y.sock,server=on,wait=off", [listener.fileno()])
    finish(p)
elif case == "nbd-fd":
    path = os.path.join(work, "n.sock")
    nbd = socket.socket(socket.AF_UNIX)
    nbd.bind(path)
    nbd.listen()
    ours, theirs = socket.socketpair()
    p = run(f"socket,id=m,fd={theirs.fileno()}", [theirs.fileno(), nbd.fileno()],
            ["--blockdev", f"driver=file,node-name=f0,filename={disk}",
             "--nbd-server", f"addr.type=fd,addr.str={nbd.fileno()}",
             "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"])
    nbd.close(); theirs.close()
    f = ours.makefile("rwb")
    f.readline()
    f.write(b'{"execute":"qmp_capabilities"}\n'); f.flush(); f.readline()
    url = f"nbd+unix:///disk?socket={path}"
    io = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 1M 64k", url], capture_output=True, text=True)
    print("qemu-io write", io.returncode)
    io = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5c 1M 64k", disk], capture_output=True, text=True)
    print("pattern on disk", "verification failed" not in io.stdout and io.returncode == 0)
    f.write(b'{"execute":"nbd-server-stop"}\n'); f.flush()
    while "event" in json.loads(line := f.readline()):
        pass
    print("nbd-server-stop", json.loads(line))
    print("socket file left", os.path.exists(path))
    f.write(b'{"execute":"quit"}\n'); f.flush()
    finish(p)
