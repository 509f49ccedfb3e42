#!/usr/bin/env python3
"""Crash-consistent bitmaps: what a crash-consistent bitmap costs guest writes through NBD.

A 16 GiB qcow2 (preallocation=metadata, so no cluster allocation is measured) is exported by backupd.
qemu-img bench writes 4 KiB blocks 1 MiB apart through NBD, queue depth 16: every write lands in a
region of its own. Pass A runs right after the bitmap is added (every region is fresh: each write
waits for a journal update, shared by the writes in flight); pass B writes the same blocks again
(every region is already dirty on disk: no journal I/O). Compared with no bitmap and with a plain
persistent bitmap. Usage: crash-consistent-bench.py [RUNS]; BACKUPD_DLL and BENCH_DIR as for lib.sh.
Prints IOPS per case and run, then medians.
"""
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DLL = os.environ.get("BACKUPD_DLL", os.path.join(HERE, "../../../src/Backup.Daemon/bin/Release/net10.0/backupd.dll"))
BENCH_DIR = os.environ.get("BENCH_DIR", "/var/tmp/backupd-bench")
IMAGE = os.path.join(BENCH_DIR, "cc16g.qcow2")
NBD = "/tmp/ccb-nbd.sock"
QMP = "/tmp/ccb-qmp.sock"
COUNT, SIZE, STEP, DEPTH = 16384, 4096, 1 << 20, 16


def qmp(cmd, **args):
    s = socket.socket(socket.AF_UNIX)
    s.connect(QMP)
    f = s.makefile("rw")
    f.readline()
    for c, a in (("qmp_capabilities", {}), (cmd, args)):
        f.write(json.dumps({"execute": c, "arguments": a}) + "\n")
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if "event" not in reply:
                break
        if "error" in reply:
            raise RuntimeError(f"{c}: {reply['error']}")
    s.close()


def start():
    for p in (NBD, QMP):
        if os.path.exists(p):
            os.unlink(p)
    d = subprocess.Popen(["dotnet", DLL,
                          "--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={IMAGE}",
                          "--nbd-server", f"addr.type=unix,addr.path={NBD}",
                          "--export", "type=nbd,id=e,node-name=n,name=n,writable=on",
                          "--chardev", f"socket,id=m,path={QMP},server=on,wait=off", "--monitor", "chardev=m"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        if os.path.exists(NBD) and os.path.exists(QMP):
            try:
                qmp("query-version")
                return d
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError("backupd did not start")


def bench():
    t = time.monotonic()
    subprocess.run(["qemu-img", "bench", "-q", "-w", "-f", "raw", "-c", str(COUNT), "-s", str(SIZE), "-S", str(STEP),
                    "-d", str(DEPTH), f"nbd+unix:///n?socket={NBD}"], check=True)
    return COUNT / (time.monotonic() - t)


def one(case):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", IMAGE, "16G"], check=True)
    d = start()
    try:
        if case != "none":
            qmp("block-dirty-bitmap-add", node="n", name="b", persistent=True, **({"crash-consistent": True} if case == "crash" else {}))
        return bench(), bench()
    finally:
        d.terminate()
        d.wait()


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    os.makedirs(BENCH_DIR, exist_ok=True)
    results = {c: ([], []) for c in ("none", "plain", "crash")}
    for r in range(runs):
        for case, (fresh, dirty) in results.items():
            a, b = one(case)
            fresh.append(a)
            dirty.append(b)
            print(f"run {r + 1} {case:6} pass A (fresh regions) {a:8.0f} IOPS   pass B (dirty regions) {b:8.0f} IOPS", flush=True)
    base_b = statistics.median(results["none"][1])
    for case, (fresh, dirty) in results.items():
        a, b = statistics.median(fresh), statistics.median(dirty)
        print(f"median {case:6} A {a:8.0f} IOPS  B {b:8.0f} IOPS  B vs no bitmap {b / base_b:5.2f}")
    os.unlink(IMAGE)


if __name__ == "__main__":
    main()
