#!/usr/bin/env python3
"""backupd side by side with qemu-storage-daemon: every figure of docs/performance.md's summary in one run.

  python3 side-by-side.py [all] [--runs N] [--write-doc]   every scenario below, the table, and with
                                                           --write-doc the table into docs/performance.md
  python3 side-by-side.py SCENARIO [--runs N]               one scenario:
    startup     exec to a QMP-ready socket (greeting read, qmp_capabilities answered), wall and CPU time
    sparse      full backups of thin 1 GiB / 16 GiB / 1 TiB qcow2 disks with 16 MiB of data (first and
                second backup of a fresh daemon), and of a full 1 GiB disk vs a warm `cp`
    incscale    incremental of the same 20.5 MiB, 2 GiB vs 16 GiB disk
    guestwrite  guest writes through NBD (qemu-img bench, 64 KiB sequential and 4 KiB random), idle vs
                during full backups
    speed       a 32 MiB incremental at speed=8 MiB/s while the guest rewrites 24 MiB of it
    full        full backup of a 2 GiB qcow2, half of it data, and `cp` of it

Each round runs every scenario for both daemons, each started fresh, in alternation (backupd first in odd
rounds, QSD first in even ones); it prints one line per daemon and round (`ROUND LABEL key=value ...`,
readable by medians.py), then medians and the table (medians; ratio = backupd / QSD). Run the whole script
under `flock` on the lock file that everyone who measures on the machine shares.

BACKUPD_BACKUP_ARGS (JSON) adds blockdev-backup arguments for backupd only (its extensions).
backupd is the published native binary (`dotnet publish src/Backup.Daemon -c Release -r linux-x64`) when
it is there, else the Release build's backupd.dll; --backupd PATH picks another (a .dll runs under
`dotnet`). --startup-variant NAME=PATH (repeatable) adds builds to the start-up scenario only.

Both daemons get the same QSD command line: --blockdev file + qcow2 (node 'src'), a QMP monitor on a
Unix socket, an NBD server and a writable export of 'src'. Backup times run from the blockdev-backup
command to BLOCK_JOB_COMPLETED, as shared/conformance/perf.py measures them. Standard library only.
"""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT, Qmp, command_for, default_backupd  # noqa: E402

BACKUPD = default_backupd()
MiB = 1 << 20
CL = 64 * 1024
PAIRS = int(os.environ.get("GUESTWRITE_PAIRS", "3"))
# Extra blockdev-backup arguments for backupd only, e.g. '{"on-cbw-error": "break-snapshot"}' (its extension).
BACKUPD_BACKUP_ARGS = json.loads(os.environ.get("BACKUPD_BACKUP_ARGS", "{}"))
GiB = 1 << 30


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def daemon_argv(kind):
    return command_for(BACKUPD) if kind == "backupd" else ["qemu-storage-daemon"]


class Daemon:
    def __init__(self, kind, wd, image):
        self.kind, self.wd = kind, wd
        self.qmp_path = os.path.join(wd, "qmp.sock")
        self.nbd_path = os.path.join(wd, "nbd.sock")
        argv = daemon_argv(kind) + [
            "--blockdev", f"driver=file,node-name=src-file,filename={image}",
            "--blockdev", "driver=qcow2,node-name=src,file=src-file",
            "--chardev", f"socket,id=mon0,path={self.qmp_path},server=on,wait=off",
            "--monitor", "chardev=mon0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}",
            "--export", "type=nbd,id=e0,node-name=src,name=src,writable=on"]
        self.log = open(os.path.join(wd, f"{kind}.log"), "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(400):
            if os.path.exists(self.qmp_path):
                try:
                    self.qmp = Qmp(self.qmp_path)
                    break
                except OSError:
                    pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"{kind} did not start")
        self.uri = f"nbd+unix:///src?socket={self.nbd_path}"
        self.targets = 0

    def stop(self):
        try:
            self.qmp.cmd("quit")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def backup(self, sync, size, backing=None, bitmap=None, flush_first=True, speed=None, started=None):
        """Runs one blockdev-backup into a new qcow2 and returns (seconds, target path). `started` is called
        once the job is running (timed: it is part of what the job competes with)."""
        self.targets += 1
        node = f"t{self.targets}"
        path = os.path.join(self.wd, f"{node}.qcow2")
        create = ["qemu-img", "create", "-f", "qcow2", path]
        create += ["-b", backing, "-F", "qcow2"] if backing else [str(size)]
        run(create)
        self.qmp.cmd("blockdev-add", **{"node-name": node, "driver": "qcow2",
                                         "file": {"driver": "file", "filename": path}})
        args = {"job-id": node, "device": "src", "target": node, "sync": sync}
        if bitmap:
            args["bitmap"] = bitmap
        if speed:
            args["speed"] = speed
        if self.kind == "backupd":
            args.update(BACKUPD_BACKUP_ARGS)
        if flush_first:
            os.sync()
        t0 = time.perf_counter()
        self.qmp.cmd("blockdev-backup", **args)
        if started:
            started()
        done = self.qmp.wait_event("BLOCK_JOB_COMPLETED", node)
        dt = time.perf_counter() - t0
        if "error" in done["data"]:
            raise RuntimeError(f"backup failed: {done['data']['error']}")
        self._del_when_idle(node)
        return dt, path

    def _del_when_idle(self, node):
        for _ in range(200):
            try:
                self.qmp.cmd("blockdev-del", **{"node-name": node})
                return
            except RuntimeError:
                time.sleep(0.01)
        raise RuntimeError(f"could not remove {node}")


def make_source(path, size, fill, seed):
    """A qcow2 of `size` bytes with `fill` of its 64 KiB clusters random (as perf.py builds its source)."""
    if os.path.exists(path):
        return path
    log(f"building {path}")
    rnd = random.Random(seed)
    ncl = size // CL
    pool = rnd.randbytes(64 * 2**20 + CL)
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        for c in sorted(rnd.sample(range(ncl), int(ncl * fill))):
            o = rnd.randrange(0, 64 * 2**20)
            f.seek(c * CL)
            f.write(pool[o:o + CL])
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path])
    os.unlink(raw)
    return path


def fresh_copy(src, wd):
    work = os.path.join(wd, "src.qcow2")
    shutil.copyfile(src, work)
    return work


def scattered_writes(uri, clusters, pattern):
    """Writes one 64 KiB pattern cluster at each given index through NBD (one qemu-io, 1000 ops per call)."""
    for i in range(0, len(clusters), 1000):
        argv = ["qemu-io", "-f", "raw", uri]
        for c in clusters[i:i + 1000]:
            argv += ["-c", f"write -P {pattern} {c * CL} {CL}"]
        run(argv)


# ------------------------------------------------------------------ scenarios

def bench_full(a, kind, wd):
    src = make_source(os.path.join(a.dir, "full-src.qcow2"), 2 * GiB, 0.5, 1)
    t0 = time.perf_counter()
    work = fresh_copy(src, wd)
    cp = time.perf_counter() - t0
    d = Daemon(kind, wd, work)
    try:
        dt, target = d.backup("full", 2 * GiB)
    finally:
        d.stop()
    if a.check:
        run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", work, target])
    return {"full": dt, "cp": cp}


def bench_incscale(a, kind, wd):
    """The same 328 scattered dirty clusters (1 % of 2 GiB) on a 2 GiB and a 16 GiB disk."""
    out = {}
    for size in (2 * GiB, 16 * GiB):
        sub = os.path.join(wd, str(size >> 30))
        os.makedirs(sub)
        image = os.path.join(sub, "src.qcow2")
        run(["qemu-img", "create", "-f", "qcow2", image, str(size)])
        d = Daemon(kind, sub, image)
        try:
            d.qmp.cmd("block-dirty-bitmap-add", node="src", name="b0")
            _, full = d.backup("full", size)
            rnd = random.Random(7)
            dirty = sorted(rnd.sample(range(size // CL), (2 * GiB // CL) // 100))
            scattered_writes(d.uri, dirty, "0x5a")
            dt, inc = d.backup("incremental", size, backing=full, bitmap="b0")
            out[f"inc{size >> 30}g"] = dt
        finally:
            d.stop()
        if a.check:
            run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", image, inc])
        shutil.rmtree(sub)
    return out


def guest_bench(uri, mode):
    """qemu-img bench writes through NBD; returns MiB/s. seq: 64 KiB sequential; rand: 4 KiB with an odd stride."""
    if mode == "seq":
        argv = ["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-d", "16", "-s", "65536", "-c", "8192", uri]
        total = 8192 * 65536
    else:
        # A stride of 4 KiB x 65537 wraps around the 2 GiB disk and touches a new 64 KiB chunk every time.
        argv = ["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-d", "16", "-s", "4096",
                "-S", str(4096 * 65537), "-c", "20000", uri]
        total = 20000 * 4096
    t0 = time.perf_counter()
    run(argv)
    return total / (time.perf_counter() - t0) / 2**20


def bench_guestwrite(a, kind, wd):
    """Guest write MiB/s idle, then while full backups run back to back (a new one as soon as one ends),
    in PAIRS alternating idle and busy passes; each ratio is busy / the idle pass just before it, and
    the round reports the median ratio (the machine's page-cache writeback makes single passes noisy).
    The busy pass overwrites clusters the backup has not copied yet, so it pays for copy-before-write."""
    src = make_source(os.path.join(a.dir, "full-src.qcow2"), 2 * GiB, 0.5, 1)
    out = {}
    for mode in ("seq", "rand"):
        work = fresh_copy(src, wd)
        d = Daemon(kind, wd, work)
        try:
            # An untimed pass first: the idle and the busy pass then both overwrite allocated clusters.
            guest_bench(d.uri, mode)
            idle, busy, ratios, backups = [], [], [], 0
            for _ in range(PAIRS):
                os.sync()
                idle.append(guest_bench(d.uri, mode))
                stop = threading.Event()
                counts = {"backups": 0}
                err = []

                def loop():
                    try:
                        while not stop.is_set():
                            d.backup("full", 2 * GiB, flush_first=False)
                            counts["backups"] += 1
                            for f in os.listdir(wd):
                                if f.startswith("t") and f.endswith(".qcow2"):
                                    os.unlink(os.path.join(wd, f))
                    except Exception as e:  # noqa: BLE001 - reported below
                        err.append(e)

                os.sync()
                th = threading.Thread(target=loop)
                th.start()
                time.sleep(0.2)  # let the first backup get going
                busy.append(guest_bench(d.uri, mode))
                stop.set()
                th.join()
                if err:
                    raise err[0]
                ratios.append(busy[-1] / idle[-1])
                backups += counts["backups"]
            out[f"idle_{mode}"] = statistics.median(idle)
            out[f"busy_{mode}"] = statistics.median(busy)
            out[f"ratio_{mode}"] = statistics.median(ratios)
            out[f"backups_{mode}"] = backups
        finally:
            d.stop()
        os.unlink(work)
    return out


def make_thin(path, size):
    """A qcow2 of `size` bytes with 16 MiB of data: 16 runs of 1 MiB spread evenly over the disk."""
    if os.path.exists(path):
        return path
    log(f"building {path}")
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)])
    step = size // 16
    argv = ["qemu-io", "-f", "qcow2", path]
    for i in range(16):
        argv += ["-c", f"write -P {0x10 + i} {i * step} 1M"]
    run(argv)
    return path


THIN = (("1g", GiB), ("16g", 16 * GiB), ("1t", 1024 * GiB))


def bench_sparse(a, kind, wd):
    """Per disk, one fresh daemon and two full backups into new qcow2 images: `cold` is the daemon's first
    backup (what a management tool that starts a daemon per backup sees: it includes backupd's JIT), `warm`
    the second. Then the full 1 GiB disk: its first backup, and `cp` of the same image with a warm cache."""
    out = {}
    for label, size in THIN:
        src = make_thin(os.path.join(a.dir, f"thin-{label}.qcow2"), size)
        d = Daemon(kind, wd, src)
        try:
            out[f"thin{label}_cold"], t1 = d.backup("full", size)
            out[f"thin{label}_warm"], t2 = d.backup("full", size)
        finally:
            d.stop()
        if a.check:
            run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", src, t2])
        os.unlink(t1)
        os.unlink(t2)
    src = make_source(os.path.join(a.dir, "data-1g.qcow2"), GiB, 1.0, 3)
    subprocess.run(["cat", src], check=True, stdout=subprocess.DEVNULL)  # warm the page cache for both
    d = Daemon(kind, wd, src)
    try:
        out["data1g"], target = d.backup("full", GiB)
    finally:
        d.stop()
    if a.check:
        run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", src, target])
    os.unlink(target)
    copy = os.path.join(wd, "cp.qcow2")
    os.sync()
    t0 = time.perf_counter()
    run(["cp", src, copy])
    out["cp1g"] = time.perf_counter() - t0
    os.unlink(copy)
    return out


def startup_once(argv):
    """Seconds from exec to a QMP monitor that has sent its greeting and answered qmp_capabilities, and the
    daemon's CPU time (user + system, all threads, from /proc) at that moment. QSD 7.2 now and then never
    greets a client that connected in the instant between its socket's listen() and the monitor's
    attachment: such a start is thrown away and made again."""
    for _ in range(5):
        try:
            return startup_attempt(argv)
        except socket.timeout:
            log(f"{argv[0]}: no greeting within 10 s, starting again")
    raise RuntimeError(f"{argv[0]} never greeted")


def startup_attempt(argv):
    wd = tempfile.mkdtemp(prefix="startup-")
    path = os.path.join(wd, "qmp.sock")
    argv = argv + ["--chardev", f"socket,id=m0,path={path},server=on,wait=off", "--monitor", "chardev=m0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = socket.socket(socket.AF_UNIX)
    try:
        deadline = t0 + 30
        while True:
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"{argv[0]} did not start")
                time.sleep(0.0005)
        sock.settimeout(10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reply = json.loads(f.readline())
        wall = time.perf_counter() - t0
        if "return" not in reply:
            raise RuntimeError(f"qmp_capabilities: {reply}")
        with open(f"/proc/{proc.pid}/stat") as st:
            fields = st.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        sock.sendall(b'{"execute": "quit"}\n')
        f.readline()
        proc.wait(20)
        return wall, cpu
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(wd, ignore_errors=True)


STARTS_PER_ROUND = 4


def bench_startup(a, kind, wd):
    """STARTS_PER_ROUND starts per round and daemon (rounds alternate the daemons, so with 3 rounds each
    median is of 12); extra backupd builds (--startup-variant) are timed in the backupd turn."""
    out = {}
    variants = [("", daemon_argv(kind))]
    if kind == "backupd":
        variants += [(f"_{name}", command_for(path)) for name, path in a.startup_variant]
    walls = {suffix: [] for suffix, _ in variants}
    cpus = {suffix: [] for suffix, _ in variants}
    for _ in range(STARTS_PER_ROUND):
        for suffix, argv in variants:
            w, c = startup_once(argv)
            walls[suffix].append(w)
            cpus[suffix].append(c)
    for suffix, _ in variants:
        out[f"start{suffix}"] = statistics.median(walls[suffix])
        out[f"startcpu{suffix}"] = statistics.median(cpus[suffix])
    return out


def bench_speed(a, kind, wd):
    """A 32 MiB incremental at speed=8 MiB/s (4 s if every copied byte counts) while the guest rewrites
    the last 24 MiB of the dirty range through NBD, starting as the job starts: copy-before-write copies
    that data, and QSD counts those copies against the limit."""
    size = GiB
    image = os.path.join(wd, "src.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(size)])
    base = 256 * MiB
    d = Daemon(kind, wd, image)
    try:
        d.qmp.cmd("block-dirty-bitmap-add", node="src", name="b0")
        _, full = d.backup("full", size)
        run(["qemu-io", "-f", "raw", d.uri, "-c", f"write -P 0x33 {base} 32M"])
        writer = {}

        def rewrite():
            argv = ["qemu-io", "-f", "raw", d.uri]
            for i in range(8, 32):
                argv += ["-c", f"write -P 0x44 {base + i * MiB} 1M"]
            writer["p"] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        dt, inc = d.backup("incremental", size, backing=full, bitmap="b0", speed=8 * MiB, started=rewrite)
        if writer["p"].wait(60) != 0:
            raise RuntimeError("guest rewrite failed: " + writer["p"].stderr.read().decode())
    finally:
        d.stop()
    if a.check:
        # The backup is the point in time of the job's start: the 0x33 data, not the rewrite.
        run(["qemu-io", "-f", "qcow2", "-r", inc, "-c", f"read -P 0x33 {base} 32M"])
    return {"speed_inc": dt}


# (label, key, unit, decimals) of the summary table; None as key: a heading row.
TABLE = [
    ("start to QMP-ready (exec → greeting + qmp_capabilities)", "start", "s", 3),
    ("CPU time used by then", "startcpu", "s", 3),
    ("full backup, thin 1 GiB disk, 16 MiB data: first backup of the daemon", "thin1g_cold", "s", 3),
    ("same, second backup", "thin1g_warm", "s", 3),
    ("full backup, thin 16 GiB disk, 16 MiB data: first", "thin16g_cold", "s", 3),
    ("same, second", "thin16g_warm", "s", 3),
    ("full backup, thin 1 TiB disk, 16 MiB data: first", "thin1t_cold", "s", 3),
    ("same, second", "thin1t_warm", "s", 3),
    ("full backup, 1 GiB disk full of data", "data1g", "s", 3),
    ("warm `cp` of that image (both daemons' rounds pooled)", "cp1g", "s", 3),
    ("full backup ÷ warm `cp`", "data1g_per_cp", "×", 2),
    ("full backup, 2 GiB disk half data", "full", "s", 3),
    ("incremental, 1 % of 2 GiB scattered, 2 GiB disk", "inc2g", "s", 3),
    ("same dirty data, 16 GiB disk", "inc16g", "s", 3),
    ("guest 64 KiB sequential writes, idle", "idle_seq", "MiB/s", 0),
    ("same during full backups", "busy_seq", "MiB/s", 0),
    ("fraction of idle kept (median of per-pass ratios)", "ratio_seq", "", 2),
    ("guest 4 KiB random writes, idle", "idle_rand", "MiB/s", 1),
    ("same during full backups", "busy_rand", "MiB/s", 1),
    ("fraction of idle kept (median of per-pass ratios)", "ratio_rand", "", 2),
    ("32 MiB incremental at 8 MiB/s, 24 MiB guest rewrites (4 s if all counts)", "speed_inc", "s", 2),
]


def medians(results):
    med = {k: {key: statistics.median(r[key] for r in v) for key in v[0]} for k, v in results.items() if v}
    # cp does not depend on the daemon: the median over every round of both is the fairer baseline.
    cps = [r["cp1g"] for v in results.values() for r in v if "cp1g" in r]
    for m in med.values():
        if cps:
            m["cp1g"] = statistics.median(cps)
            if "data1g" in m:
                m["data1g_per_cp"] = m["data1g"] / m["cp1g"]
    return med


def table(results, variants=()):
    """The markdown table: medians per daemon and the ratio backupd / QSD (for times lower is better,
    for throughput and fractions higher is better)."""
    med = medians(results)
    b, q = med.get("backupd", {}), med.get("qsd", {})
    lines = ["| figure | backupd | QSD | backupd / QSD |", "| --- | ---: | ---: | ---: |"]
    rows = list(TABLE)
    for i, (name, _) in enumerate(variants):
        rows[2 + 2 * i:2 + 2 * i] = [(f"start to QMP-ready, backupd {name}", f"start_{name}", "s", 3),
                                     (f"CPU time used by then, backupd {name}", f"startcpu_{name}", "s", 3)]
    for label, key, unit, dec in rows:
        if key not in b and key not in q:
            continue

        def cell(m):
            return f"{m[key]:.{dec}f}{' ' + unit if unit else ''}" if key in m else "–"

        ratio = f"{b[key] / q[key]:.2f}" if key in b and key in q and q[key] else "–"
        if key.startswith(("start_", "startcpu_")):
            base = key.split("_", 1)[0]  # a variant's ratio is to QSD's start-up
            ratio = f"{b[key] / q[base]:.2f}" if key in b and base in q else "–"
        if key == "cp1g":
            ratio = "–"
        lines.append(f"| {label} | {cell(b)} | {cell(q)} | {ratio} |")
    return "\n".join(lines)


BEGIN = "<!-- side-by-side: begin (written by tests/Backup.Benchmarks/scripts/side-by-side.py) -->"
END = "<!-- side-by-side: end -->"


def write_doc(text):
    """Replaces the block between the markers in docs/performance.md (appends a section the first time)."""
    path = os.path.join(ROOT, "docs/performance.md")
    with open(path) as f:
        doc = f.read()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[:doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip("\n") + "\n\n## Side by side with qemu-storage-daemon\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


def qsd_version():
    return run(["qemu-storage-daemon", "--version"]).stdout.split("\n")[0].replace("qemu-storage-daemon version ", "")


SCENARIOS = {"startup": bench_startup, "sparse": bench_sparse, "incscale": bench_incscale,
             "guestwrite": bench_guestwrite, "speed": bench_speed, "full": bench_full}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", nargs="?", default="all", choices=["all", *SCENARIOS])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/var/tmp/backup-bench"))
    ap.add_argument("--only", choices=["backupd", "qsd"], help="run one daemon only")
    ap.add_argument("--check", action="store_true", help="verify every backup's content (untimed)")
    ap.add_argument("--backupd", help="backupd executable or .dll (default: the published binary, else Release)")
    ap.add_argument("--startup-variant", action="append", default=[], type=lambda v: tuple(v.split("=", 1)),
                    metavar="NAME=PATH", help="another backupd build to time in the start-up scenario")
    ap.add_argument("--write-doc", action="store_true", help="write the table into docs/performance.md")
    ap.add_argument("--table-from", metavar="FILE", help="make the table from the round lines of an earlier "
                    "run's output (for a run cut short) instead of measuring")
    a = ap.parse_args()
    global BACKUPD  # noqa: PLW0603 - one daemon binary for the whole run
    if a.backupd:
        BACKUPD = os.path.abspath(a.backupd)
    os.makedirs(a.dir, exist_ok=True)
    scenarios = list(SCENARIOS) if a.scenario == "all" else [a.scenario]
    if a.scenario == "all":
        scenarios.remove("full")  # the 2 GiB half-full disk: covered by the 1 GiB full disk and cp
    kinds = [a.only] if a.only else ["backupd", "qsd"]
    results = {k: [] for k in kinds}
    load0, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if a.table_from:
        rounds = {}
        with open(a.table_from) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[0].isdigit() and parts[1] in results:
                    rounds.setdefault((int(parts[0]), parts[1]), {}).update(
                        (k, float(v)) for k, v in (kv.split("=", 1) for kv in parts[2:]))
        # Only rounds that have every figure, so each median is over the same rounds.
        for kind in kinds:
            mine = [v for (_, k), v in sorted(rounds.items()) if k == kind]
            keys = set().union(*mine) if mine else set()
            results[kind] = [v for v in mine if set(v) == keys]
        a.runs = min(len(v) for v in results.values())
    for r in range(1, 0 if a.table_from else a.runs + 1):
        merged = {k: {} for k in kinds}
        for name in scenarios:
            for kind in (kinds if r % 2 else kinds[::-1]):
                wd = os.path.join(a.dir, f"run-{kind}")
                shutil.rmtree(wd, ignore_errors=True)
                os.makedirs(wd)
                res = SCENARIOS[name](a, kind, wd)
                shutil.rmtree(wd, ignore_errors=True)
                merged[kind].update(res)
                print(f"{r} {kind} " + " ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
        for kind in kinds:
            results[kind].append(merged[kind])
    load1 = os.getloadavg()
    for kind in kinds:
        keys = results[kind][0].keys()
        print(f"median {kind}: " + " ".join(
            f"{k}={statistics.median(x[k] for x in results[kind]):.4g}" for k in keys), flush=True)
    binary = os.path.relpath(BACKUPD, ROOT) if BACKUPD.startswith(ROOT) else BACKUPD
    when = (f"Rounds read from {os.path.basename(a.table_from)}" if a.table_from else
            f"Run of {started}, load average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end")
    text = (f"{when}: {a.runs} rounds, medians; backupd `{binary}`, qemu-storage-daemon {qsd_version()}; "
            f"{os.cpu_count()} CPUs. "
            "The machine is shared with other sessions' builds and tests, so single figures move by ±30 % "
            "and more between runs; the ratios of one run are the figures to compare.\n\n"
            + table(results, a.startup_variant))
    print(text)
    if a.write_doc:
        write_doc(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
