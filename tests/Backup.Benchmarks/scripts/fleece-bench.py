#!/usr/bin/env python3
"""Guest impact of pull-mode backup (fleecing): backupd vs qemu-storage-daemon 7.2, side by side.

  python3 fleece-bench.py [--runs N] [--seconds S] [--size-mib M] [--dir DIR]

Each daemon gets QEMU's fleecing graph on one command line: a qcow2 disk 'src' (M MiB, full of data), a
fleecing target 'tgt', a copy-before-write filter 'cbw' (file=src, target=tgt), a snapshot-access node
'acc' over it, and two NBD exports: 'disk' (node cbw, writable: the guest) and 'snap' (node acc, read-only:
the backup appliance). Two targets:

  same-disk  a fresh qcow2 file next to the disk
  slow       a raw NBD node served by nbdkit's memory plugin behind its delay filter (wdelay=2ms)

For each target and daemon, three passes of S seconds, each on a freshly started daemon:

  plain      the guest writes to an export of 'src' itself (no filter): the baseline
  fleece     the guest writes through the filter; nothing reads the snapshot
  pull       the same while nbdcopy reads the 'snap' export to null: at full speed, again and again

The guest is this script: one synchronous 4 KiB write at a time (queue depth 1) at random 4 KiB-aligned
offsets, over NBD (standard library only), so every write's latency is measured; it prints throughput and
the p50/p99 latency per pass, then medians over the runs and the ratios to the plain pass. Runs
alternate which daemon goes first. Run under `flock /tmp/perf.lock` on a shared machine.
"""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import command_for, default_backupd  # noqa: E402

BACKUPD = default_backupd()
MiB = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_socket(path, proc, what):
    for _ in range(400):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return s
            except OSError:
                s.close()
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {path}")


class NbdWriter:
    """A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies, synchronous 4 KiB writes."""

    def __init__(self, path, export):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        greeting = self._recv(18)
        if greeting[:8] != b"NBDMAGIC":
            raise RuntimeError("not an NBD server")
        self.sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
        while True:
            _, _, kind, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if kind & 0x80000000:
                raise RuntimeError(f"NBD_OPT_GO refused: {kind:#x} {payload!r}")
            if kind == 1:  # NBD_REP_ACK
                break
        self.handle = 0

    def _recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("NBD server closed the connection")
            buf += chunk
        return bytes(buf)

    def write(self, offset, data):
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, self.handle, offset, len(data)) + data)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != 0x67446698 or handle != self.handle or error:
            raise RuntimeError(f"write failed: error {error}")

    def close(self):
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # NBD_CMD_DISC
        self.sock.close()


class Daemon:
    def __init__(self, kind, wd, disk, target_args, plain):
        self.wd = wd
        self.nbd = os.path.join(wd, "nbd.sock")
        qmp = os.path.join(wd, "qmp.sock")
        for p in (self.nbd, qmp):
            if os.path.exists(p):
                os.unlink(p)
        argv = (command_for(BACKUPD) if kind == "backupd" else ["qemu-storage-daemon"]) + [
            "--blockdev", f"driver=file,node-name=src-file,filename={disk}",
            "--blockdev", "driver=qcow2,node-name=src,file=src-file",
            "--chardev", f"socket,id=mon0,path={qmp},server=on,wait=off",
            "--monitor", "chardev=mon0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
        ]
        if plain:
            argv += ["--export", "type=nbd,id=e0,node-name=src,name=disk,writable=on"]
        else:
            argv += ["--blockdev", json.dumps(target_args),
                     "--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tgt",
                     "--blockdev", "driver=snapshot-access,node-name=acc,file=cbw",
                     "--export", "type=nbd,id=e0,node-name=cbw,name=disk,writable=on",
                     "--export", "type=nbd,id=e1,node-name=acc,name=snap"]
        self.log = open(os.path.join(wd, f"{kind}.log"), "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_socket(self.nbd, self.proc, kind).close()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def guest_pass(nbd_path, size, seconds, seed):
    rng = random.Random(seed)
    data = os.urandom(4096)
    writer = NbdWriter(nbd_path, "disk")
    latencies = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        writer.write(rng.randrange(size // 4096) * 4096, data)
        latencies.append(time.perf_counter() - t0)
    writer.close()
    latencies.sort()
    return {
        "mibs": len(latencies) * 4096 / MiB / seconds,
        "p50": latencies[len(latencies) // 2] * 1000,
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def one(kind, mode, target, wd, disk, size, seconds, seed):
    target_args, slow = target
    stop_slow = None
    if slow and mode != "plain":
        stop_slow = slow()
    fresh = os.path.join(wd, "tgt.qcow2")
    if not slow:
        if os.path.exists(fresh):
            os.unlink(fresh)
        run(["qemu-img", "create", "-q", "-f", "qcow2", fresh, str(size)])
    d = Daemon(kind, wd, disk, target_args, plain=(mode == "plain"))
    stop = threading.Event()
    reads = []

    def pull():
        # The appliance reads the whole view again and again, at full speed, until the pass ends.
        while not stop.is_set():
            p = subprocess.Popen(["nbdcopy", f"nbd+unix:///snap?socket={d.nbd}", "null:"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while p.poll() is None:
                if stop.wait(0.05):
                    p.kill()
                    p.wait()
                    return
            reads.append(p.returncode)

    reader = threading.Thread(target=pull) if mode == "pull" else None
    try:
        if reader is not None:
            reader.start()
            time.sleep(0.2)
        result = guest_pass(d.nbd, size, seconds, seed)
        if reader is not None:
            result["full_reads"] = len(reads)
            if any(reads):
                raise RuntimeError(f"nbdcopy failed: {reads}")
    finally:
        stop.set()
        if reader is not None:
            reader.join()
        d.stop()
        if stop_slow:
            stop_slow()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR", "/var/tmp/fleece-bench"))
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    wd = tempfile.mkdtemp(dir=a.dir)
    size = a.size_mib * MiB
    disk = os.path.join(wd, "disk.qcow2")
    log(f"making a {a.size_mib} MiB disk full of data")
    run(["qemu-img", "create", "-q", "-f", "qcow2", disk, str(size)])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", disk])

    slow_sock = os.path.join(wd, "slow.sock")

    def start_slow():
        if os.path.exists(slow_sock):
            os.unlink(slow_sock)
        p = subprocess.Popen(["nbdkit", "-f", "-U", slow_sock, "--filter=delay", "memory", str(size), "wdelay=2ms"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_socket(slow_sock, p, "nbdkit").close()

        def stop():
            p.terminate()
            p.wait()
        return stop

    targets = {
        "same-disk": ({"driver": "qcow2", "node-name": "tgt",
                       "file": {"driver": "file", "filename": os.path.join(wd, "tgt.qcow2")}}, None),
        "slow": ({"driver": "raw", "node-name": "tgt",
                  "file": {"driver": "nbd", "server": {"type": "unix", "path": slow_sock}}}, start_slow),
    }
    results = {}
    try:
        for r in range(a.runs):
            order = ["backupd", "qsd"] if r % 2 == 0 else ["qsd", "backupd"]
            for tname, target in targets.items():
                for mode in ("plain", "fleece", "pull"):
                    for kind in order:
                        res = one(kind, mode, target, wd, disk, size, a.seconds, seed=r)
                        results.setdefault((tname, mode, kind), []).append(res)
                        print(f"{r} {kind} {tname} {mode} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                                    for k, v in res.items()), flush=True)
    finally:
        shutil.rmtree(wd, ignore_errors=True)

    print()
    print("| target | pass | backupd MiB/s | p50 ms | p99 ms | QSD MiB/s | p50 ms | p99 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    med = {}
    for tname in targets:
        for mode in ("plain", "fleece", "pull"):
            cells = []
            for kind in ("backupd", "qsd"):
                rs = results[(tname, mode, kind)]
                m = {k: statistics.median(x[k] for x in rs) for k in ("mibs", "p50", "p99")}
                med[(tname, mode, kind)] = m
                cells += [f"{m['mibs']:.2f}", f"{m['p50']:.3f}", f"{m['p99']:.3f}"]
            print(f"| {tname} | {mode} | " + " | ".join(cells) + " |")
    print()
    print("| target | pass | backupd throughput / its plain | QSD throughput / its plain |")
    print("| --- | --- | ---: | ---: |")
    for tname in targets:
        for mode in ("fleece", "pull"):
            ratios = [med[(tname, mode, k)]["mibs"] / med[(tname, "plain", k)]["mibs"] for k in ("backupd", "qsd")]
            print(f"| {tname} | {mode} | {ratios[0]:.2f} | {ratios[1]:.2f} |")


if __name__ == "__main__":
    main()
