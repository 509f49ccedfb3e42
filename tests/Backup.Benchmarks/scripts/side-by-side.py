#!/usr/bin/env python3
"""End-to-end backup benchmarks of issue 6, backupd side by side with qemu-storage-daemon.

  python3 backup-bench.py full        [--runs N]   full backup of a 2 GiB qcow2, half of it data
  python3 backup-bench.py incscale    [--runs N]   incremental of the same 20.5 MiB, 2 GiB vs 16 GiB disk
  python3 backup-bench.py guestwrite  [--runs N]   guest writes through NBD, idle vs during full backups
  python3 backup-bench.py sparse      [--runs N]   full backups of thin 1 GiB / 16 GiB / 1 TiB qcow2 disks with
                                                   16 MiB of data, and of a full 1 GiB disk vs a warm `cp`
                                                   (issue 16); ends with the table of medians and ratios

Each round starts every daemon fresh, in alternation (backupd, then QSD), and prints one line per daemon
and round (`ROUND LABEL key=seconds ...`, readable by medians.py), then medians. Every timed step is
wrapped in `flock /work/perf.lock` by the caller (run the whole script under it): the machine is shared.

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
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "../../.."))
DLL = os.environ.get("BACKUPD_DLL", os.path.join(ROOT, "src/Backup.Daemon/bin/Release/net10.0/backupd.dll"))
CL = 64 * 1024
PAIRS = int(os.environ.get("GUESTWRITE_PAIRS", "3"))
GiB = 1 << 30


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(argv, **kw):
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


class Qmp:
    """Minimal QMP client: one request at a time; events are queued while waiting for replies."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.events = []
        json.loads(self.file.readline())
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def cmd(self, command, **args):
        self.sock.sendall(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        while True:
            m = self._read()
            if "event" in m:
                self.events.append(m)
            elif "error" in m:
                raise RuntimeError(f"{command}: {m['error']['desc']}")
            else:
                return m["return"]

    def wait_event(self, name, job=None):
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and (job is None or e["data"].get("device", e["data"].get("id")) == job):
                    return self.events.pop(i)
            self.events.append(self._read())


class Daemon:
    def __init__(self, kind, wd, image):
        self.kind, self.wd = kind, wd
        self.qmp_path = os.path.join(wd, "qmp.sock")
        self.nbd_path = os.path.join(wd, "nbd.sock")
        argv = (["dotnet", DLL] if kind == "backupd" else ["qemu-storage-daemon"]) + [
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

    def backup(self, sync, size, backing=None, bitmap=None, flush_first=True):
        """Runs one blockdev-backup into a new qcow2 and returns (seconds, target path)."""
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
        if flush_first:
            os.sync()
        t0 = time.perf_counter()
        self.qmp.cmd("blockdev-backup", **args)
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


def print_table(results):
    """The markdown table of docs/performance.md: medians per daemon and the ratio backupd / QSD."""
    rows = [("thin 1 GiB, 16 MiB data: first backup", "thin1g_cold"),
            ("thin 1 GiB: second backup", "thin1g_warm"),
            ("thin 16 GiB, 16 MiB data: first backup", "thin16g_cold"),
            ("thin 16 GiB: second backup", "thin16g_warm"),
            ("thin 1 TiB, 16 MiB data: first backup", "thin1t_cold"),
            ("thin 1 TiB: second backup", "thin1t_warm"),
            ("full 1 GiB of data", "data1g"),
            ("`cp` of that image (warm)", "cp1g")]
    med = {k: {key: statistics.median(r[key] for r in v) for key in v[0]} for k, v in results.items() if v}
    print("| case | backupd s | QSD s | backupd / QSD |")
    print("| --- | --- | --- | --- |")
    for name, key in rows:
        b, q = med.get("backupd", {}).get(key), med.get("qsd", {}).get(key)
        cell = lambda x: f"{x:.3f}" if x is not None else "–"  # noqa: E731
        ratio = f"{b / q:.2f}" if b is not None and q else "–"
        print(f"| {name} | {cell(b)} | {cell(q)} | {ratio} |")
    # cp does not depend on the daemon: the median over every round of both is the fairer baseline.
    cps = [r["cp1g"] for v in results.values() for r in v]
    for kind, m in med.items():
        if "data1g" in m and cps:
            print(f"\n{kind}: full backup of 1 GiB of data / warm cp (median of all rounds, "
                  f"{statistics.median(cps):.3f} s) = {m['data1g'] / statistics.median(cps):.2f}")


SCENARIOS = {"full": bench_full, "incscale": bench_incscale, "guestwrite": bench_guestwrite, "sparse": bench_sparse}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=SCENARIOS)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/var/tmp/backup-bench"))
    ap.add_argument("--only", choices=["backupd", "qsd"], help="run one daemon only")
    ap.add_argument("--check", action="store_true", help="qemu-img compare every backup (untimed)")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    kinds = [a.only] if a.only else ["backupd", "qsd"]
    results = {k: [] for k in kinds}
    for r in range(1, a.runs + 1):
        for kind in kinds:
            wd = os.path.join(a.dir, f"run-{kind}")
            shutil.rmtree(wd, ignore_errors=True)
            os.makedirs(wd)
            res = SCENARIOS[a.scenario](a, kind, wd)
            shutil.rmtree(wd, ignore_errors=True)
            results[kind].append(res)
            print(f"{r} {kind} " + " ".join(f"{k}={v:.4g}" for k, v in res.items()), flush=True)
    for kind in kinds:
        keys = results[kind][0].keys()
        print(f"median {kind}: " + " ".join(
            f"{k}={statistics.median(x[k] for x in results[kind]):.4g}" for k in keys), flush=True)
    if a.scenario == "sparse":
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
