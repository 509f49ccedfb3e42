#!/usr/bin/env python3
"""Full backup of 1 GiB of data to an NBD target over a Unix socket: backupd vs qemu-storage-daemon 7.2.

  python3 nbd-target-bench.py [--runs N] [--size-mib M]

The source is a raw file of M MiB (default 1024) full of random data (no holes, so every byte goes over
the wire). The target is qemu-nbd serving a raw file of the same size (writeback cache) on a Unix socket,
started fresh for every run. Each daemon opens the target with `blockdev-add driver=nbd` and runs
`blockdev-backup sync=full`; the time runs from the command to BLOCK_JOB_COMPLETED. Runs alternate
(backupd, then QSD); the script prints every run, the medians and the ratio QSD/backupd (> 1: backupd
is faster). Run it under `flock /tmp/perf.lock` on a shared machine. Standard library only.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Qmp, command_for, default_backupd  # noqa: E402

# $BACKUPD_DLL (the older name) or $BACKUPD, else the published binary, else the Release build.
DLL = os.environ.get("BACKUPD_DLL", default_backupd())


def wait_for(path, proc):
    for _ in range(600):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{path} did not appear")


def one_run(daemon, work, src, size):
    target = os.path.join(work, "target.raw")
    with open(target, "wb") as f:
        f.truncate(size)
    nbd_sock = os.path.join(work, "t.sock")
    qmp_sock = os.path.join(work, "qmp.sock")
    for p in (nbd_sock, qmp_sock):
        if os.path.exists(p):
            os.unlink(p)
    server = subprocess.Popen(["qemu-nbd", "-t", "-e", "4", "-k", nbd_sock, "-f", "raw", "-x", "exp",
                               "--cache=writeback", target], stderr=subprocess.DEVNULL)
    argv = command_for(DLL) if daemon == "backupd" else ["qemu-storage-daemon"]
    argv += ["--blockdev", json.dumps({"driver": "raw", "node-name": "src",
                                       "file": {"driver": "file", "filename": src}}),
             "--chardev", f"socket,id=m,path={qmp_sock},server=on,wait=off", "--monitor", "chardev=m"]
    d = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(nbd_sock, server)
        wait_for(qmp_sock, d)
        q = Qmp(qmp_sock)
        q.cmd("blockdev-add", driver="nbd", **{"node-name": "t"}, server={"type": "unix", "path": nbd_sock}, export="exp")
        start = time.monotonic()
        q.cmd("blockdev-backup", device="src", target="t", sync="full", **{"job-id": "j"})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        elapsed = time.monotonic() - start
        if "error" in ev["data"]:
            raise RuntimeError(f"{daemon}: backup failed: {ev['data']['error']}")
        q.cmd("blockdev-del", **{"node-name": "t"})
        q.cmd("quit")
    finally:
        d.wait(timeout=30) if d.poll() is None else None
        server.terminate()
        server.wait()
    if subprocess.run(["cmp", "-s", src, target]).returncode != 0:
        raise RuntimeError(f"{daemon}: target differs from source")
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-mib", type=int, default=1024)
    a = ap.parse_args()
    size = a.size_mib << 20
    work = tempfile.mkdtemp(prefix="nbdbench-", dir="/tmp")
    try:
        src = os.path.join(work, "src.raw")
        with open(src, "wb") as f:
            for _ in range(a.size_mib):
                f.write(os.urandom(1 << 20))
        times = {"backupd": [], "qsd": []}
        for r in range(a.runs):
            for daemon in ("backupd", "qsd"):
                t = one_run(daemon, work, src, size)
                times[daemon].append(t)
                print(f"{r} {daemon} seconds={t:.3f} MiB/s={a.size_mib / t:.0f}", flush=True)
        mb, mq = statistics.median(times["backupd"]), statistics.median(times["qsd"])
        print(f"median backupd {mb:.3f} s ({a.size_mib / mb:.0f} MiB/s), qsd {mq:.3f} s ({a.size_mib / mq:.0f} MiB/s), "
              f"ratio qsd/backupd {mq / mb:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
