#!/usr/bin/env python3
"""Fault soak: seeded, randomized trials against the real backupd, each checked for lost data.

Each trial starts backupd on a fresh qcow2 disk exported over NBD, with two persistent bitmaps: `plain`
(QEMU's kind, stored only at a clean close) and `cc` (crash-consistent, docs/crash-consistent-bitmaps.md),
both synchronized with a full backup.  Then one fault:

  kill       kill -9 at a random moment during guest writes (qemu-io over NBD, or HMP qemu-io) and/or a
             backup job (full with a bitmap, or incremental) pushing to a file target
  cancel     block-job-cancel at a random moment of a backup, guest writes going on or not
  eio        EIO (or ENOSPC) injected on the backup target through blkdebug
  enospc     the backup target on a tmpfs far too small for it (root only)
  nbd-eio    the target is an NBD export of nbdkit with its error filter (only when backupd has an `nbd`
             block driver)

and the checks that follow it:

  - every image passes `qemu-img check` (leaked clusters allowed after a kill -9, nothing worse);
  - after a kill: the daemon restarts on the same images; `plain` is inconsistent (or absent), `cc` is
    not, and an incremental backup from `cc` compares equal (`qemu-img compare`) to the disk as the
    crash left it;
  - without a kill: a failed or cancelled backup left its bitmap whole, so an incremental from each
    bitmap is complete (compares equal to the disk); after a clean quit the daemon restarts with both
    bitmaps consistent.

A trial's randomness comes from (seed, trial number) alone: `--seed S --only N` replays trial N.
Prints `soak: trials=N violations=V seed=S` last; exit status 1 when V > 0.
Python 3 standard library only.
"""

import argparse
import collections
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests", "iotests"))

from qmplib import QmpClient, QmpClosed, QmpError, QmpTimeout  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
DISK_SIZE = 64 * MiB
GRANULARITY = 64 * KiB
KINDS = ("kill", "cancel", "eio", "enospc", "nbd-eio")
# How often each kind is drawn; kinds that cannot run here are dropped from the draw.
WEIGHTS = {"kill": 4, "cancel": 2, "eio": 2, "enospc": 1, "nbd-eio": 1}


class Violation(Exception):
    """A broken promise: the trial stops and is reported."""


class Setup(Exception):
    """The harness itself failed (a tool missing, a timeout of our own): reported, not a violation."""


def run(argv, timeout=120, check=False):
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise Violation(f"{shlex.join(argv)} did not finish in {timeout} s") from e
    if check and result.returncode != 0:
        raise Setup(f"{shlex.join(argv)} failed ({result.returncode}): {result.stdout.strip()}")
    return result


# -- the daemon ---------------------------------------------------------------------------------------

class Daemon:
    """backupd serving disk.qcow2 as node drive0, exported writable as drive0, QMP on a Unix socket."""

    def __init__(self, command, directory, disk, generation):
        self.directory = directory
        self.qmp_socket = os.path.join(directory, "qmp.sock")
        self.nbd_socket = os.path.join(directory, "nbd.sock")
        for s in (self.qmp_socket, self.nbd_socket):
            if os.path.exists(s):
                os.unlink(s)
        self.log_path = os.path.join(directory, f"daemon{generation}.log")
        argv = list(command) + [
            "--blockdev", f"driver=file,node-name=file0,filename={disk}",
            "--blockdev", "driver=qcow2,node-name=drive0,file=file0",
            "--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}",
            "--export", "type=nbd,id=e0,node-name=drive0,name=drive0,writable=on",
            "--chardev", f"socket,id=mon0,path={self.qmp_socket},server=on,wait=off",
            "--monitor", "chardev=mon0",
        ]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                        cwd=directory, start_new_session=True)
        self.qmp = QmpClient(self.qmp_socket)
        try:
            self.qmp.connect(timeout=60, alive=lambda: self.process.poll() is None)
        except (QmpClosed, QmpTimeout, OSError) as e:
            self.kill()
            text = f"the daemon did not start on the images: {e}; log: {self.log_tail()}"
            # The first start of a trial is on fresh images: failing there is the harness's problem.
            raise (Violation if generation > 1 else Setup)(text) from e

    @property
    def nbd_uri(self):
        return f"nbd+unix:///drive0?socket={self.nbd_socket}"

    def log_tail(self, lines=15):
        try:
            with open(self.log_path, errors="replace") as f:
                return " | ".join(f.read().splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self):
        return self.process.poll() is None

    def kill(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.qmp.close()
        self._log.close()

    def quit(self):
        """A clean shutdown, which must end the process with status 0."""
        try:
            self.qmp.execute("quit", timeout=30)
        except (QmpClosed, QmpTimeout, OSError):
            pass
        self.qmp.close()
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired as e:
            self.kill()
            raise Violation("the daemon did not exit within 60 s of quit") from e
        self._log.close()
        if code != 0:
            raise Violation(f"the daemon exited with status {code} after quit; log: {self.log_tail()}")

    def command(self, name, arguments=None, timeout=60):
        try:
            return self.qmp.command(name, arguments, timeout=timeout)
        except QmpError as e:
            raise Violation(f"{name} {json.dumps(arguments)} failed: {e.error.get('desc')}") from e
        except (QmpClosed, QmpTimeout, OSError) as e:
            raise Violation(f"{name}: {e}; alive={self.alive()}; log: {self.log_tail()}") from e

    def bitmaps(self):
        """drive0's named bitmaps by name."""
        for node in self.command("query-named-block-nodes", {"flat": True}):
            if node["node-name"] == "drive0":
                return {b["name"]: b for b in node.get("dirty-bitmaps", []) if b.get("name")}
        raise Violation("drive0 is missing from query-named-block-nodes")

    def wait_job(self, job_id, timeout=120, on_error=None):
        """Waits for the job's end: ('completed', None) / ('completed', error text) / ('cancelled', None)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Violation(f"job {job_id} did not end within {timeout} s")
            try:
                event = self.qmp.wait_event_any(timeout=left)
            except QmpTimeout:
                continue
            except (QmpClosed, OSError) as e:
                raise Violation(f"QMP lost while waiting for job {job_id}: {e}; log: {self.log_tail()}") from e
            data = event.get("data", {})
            if data.get("device") != job_id:
                continue
            if event["event"] == "BLOCK_JOB_COMPLETED":
                return "completed", data.get("error")
            if event["event"] == "BLOCK_JOB_CANCELLED":
                return "cancelled", None
            if event["event"] == "BLOCK_JOB_ERROR" and on_error:
                on_error(data)


# -- guest writes ---------------------------------------------------------------------------------------

def guest_commands(rng, count, pattern_base):
    """qemu-io commands: patterned writes, some write-zeroes and discards, 512-byte aligned."""
    commands = []
    for i in range(count):
        length = rng.choice((4 * KiB, 16 * KiB, 64 * KiB, 100 * KiB, 256 * KiB, rng.randrange(1, 1024) * 512))
        offset = rng.randrange(0, (DISK_SIZE - length) // 512) * 512
        r = rng.random()
        if r < 0.85:
            commands.append(f"write -P 0x{(pattern_base + i) % 255 + 1:02x} {offset} {length}")
        elif r < 0.95:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"discard {offset} {length}")
    return commands


class Writer:
    """Guest writes running beside the trial: qemu-io over NBD (one process), or HMP qemu-io on a QMP
    connection of its own. `acknowledged` counts the writes that returned success."""

    def __init__(self, daemon, commands, via_hmp):
        self.daemon = daemon
        self.commands = commands
        self.via_hmp = via_hmp
        self.acknowledged = 0
        self.failure = None
        self._process = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        if self.via_hmp:
            qmp = QmpClient(self.daemon.qmp_socket)
            try:
                qmp.connect(timeout=30)
                for c in self.commands:
                    reply = qmp.command("human-monitor-command", {"command-line": f'qemu-io drive0 "{c}"'})
                    if "error" in reply.lower() or "failed" in reply.lower():
                        self.failure = f"HMP qemu-io {c}: {reply.strip()}"
                        return
                    self.acknowledged += 1
            except (QmpClosed, QmpTimeout, QmpError, OSError) as e:
                self.failure = f"HMP qemu-io: {e}"
            finally:
                qmp.close()
        else:
            argv = ["qemu-io", "-f", "raw", self.daemon.nbd_uri]
            for c in self.commands:
                argv += ["-c", c]
            self._process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out, _ = self._process.communicate()
            self.acknowledged = sum(1 for line in out.splitlines()
                                    if line.startswith(("wrote ", "discard ")) and "bytes at offset" in line)
            if self._process.returncode != 0 or "failed" in out:
                self.failure = f"qemu-io over NBD: {out.strip()[-300:]}"

    def alive(self):
        return self._thread.is_alive()

    def join(self, timeout=180):
        self._thread.join(timeout)
        if self._thread.is_alive():
            if self._process is not None:
                self._process.kill()
            raise Violation(f"guest writes did not finish within {timeout} s")


# -- one trial -------------------------------------------------------------------------------------------

class Trial:
    def __init__(self, soak, number):
        self.soak = soak
        self.number = number
        self.rng = random.Random(f"{soak.seed}:{number}")
        self.dir = os.path.join(soak.root, f"t{number:05d}")
        os.makedirs(self.dir)
        self.disk = self.path("disk.qcow2")
        # The backups each bitmap's next incremental stacks on, newest last.
        self.chains = {"cc": [], "plain": []}
        self.crashed = False
        self.generation = 0
        self.daemon = None
        self.mounts = []
        self.story = []
        self.kind = None
        self.fault_hit = True
        self.started = time.monotonic()

    def path(self, name):
        return os.path.join(self.dir, name)

    def note(self, text):
        self.story.append(text)

    def start(self):
        self.generation += 1
        self.daemon = Daemon(self.soak.command, self.dir, self.disk, self.generation)
        return self.daemon

    # Images --------------------------------------------------------------------------------------------

    def create_target(self, name, bitmap, full, directory=None):
        target = os.path.join(directory or self.dir, name)
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if not full:
            args += ["-b", self.chains[bitmap][-1], "-F", "qcow2", target]
        else:
            args += [target, str(DISK_SIZE)]
        run(args, check=True)
        return target

    def check_image(self, image, leaks_allowed):
        result = run(["qemu-img", "check", "--output=json", "-f", "qcow2", image])
        try:
            report = json.loads(result.stdout)
        except ValueError:
            report = {}
        ok = result.returncode == 0 or (result.returncode == 3 and leaks_allowed)
        if not ok or report.get("corruptions", 0) or report.get("check-errors", 0):
            raise Violation(f"qemu-img check {os.path.basename(image)}: exit {result.returncode}: "
                            f"{result.stdout.strip()[:400]}")

    def compare(self, image, reference, reference_format, what):
        result = run(["qemu-img", "compare", "-f", "qcow2", "-F", reference_format, image, reference])
        if result.returncode != 0:
            raise Violation(f"{what}: qemu-img compare: {result.stdout.strip()[:300]}")

    # Backups ---------------------------------------------------------------------------------------------

    def add_target(self, node, filename, inject=None):
        file_node = {"driver": "file", "filename": filename}
        if inject is not None:
            file_node = {"driver": "blkdebug", "image": file_node, "inject-error": inject}
        self.daemon.command("blockdev-add", {"driver": "qcow2", "node-name": node, "file": file_node})

    def backup_arguments(self, job_id, target_node, bitmap, full, **extra):
        arguments = {"job-id": job_id, "device": "drive0", "target": target_node, "bitmap": bitmap}
        if full:
            arguments.update({"sync": "full", "bitmap-mode": "on-success"})
        else:
            arguments["sync"] = "incremental"
        arguments.update(extra)
        return arguments

    def record_success(self, bitmap, target, full):
        if full:
            self.chains[bitmap] = [target]
        else:
            self.chains[bitmap].append(target)

    def incremental(self, bitmap, tag):
        """An incremental backup from `bitmap` onto its chain, which must succeed; the new image."""
        target = self.create_target(f"{tag}-{bitmap}.qcow2", bitmap, full=False)
        node = f"v{tag}{bitmap}"
        self.add_target(node, target)
        self.daemon.command("blockdev-backup", self.backup_arguments(f"j{node}", node, bitmap, full=False))
        status, error = self.daemon.wait_job(f"j{node}")
        self.daemon.command("blockdev-del", {"node-name": node})
        if status != "completed" or error:
            raise Violation(f"the checking incremental from {bitmap} ended {status}: {error}")
        self.record_success(bitmap, target, full=False)
        return target

    def base(self):
        """Both bitmaps synchronized with one full backup (a transaction: the same point in time)."""
        target = self.create_target("base.qcow2", "cc", full=True)
        self.add_target("base", target)
        self.daemon.command("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "drive0", "name": "cc", "persistent": True, "crash-consistent": True,
                      "granularity": GRANULARITY}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "drive0", "name": "plain"}},
            {"type": "blockdev-backup",
             "data": {"job-id": "jbase", "device": "drive0", "target": "base", "sync": "full"}},
        ]})
        status, error = self.daemon.wait_job("jbase")
        if status != "completed" or error:
            raise Violation(f"the base backup ended {status}: {error}")
        self.daemon.command("blockdev-del", {"node-name": "base"})
        self.chains = {"cc": [target], "plain": [target]}

    # The trial ---------------------------------------------------------------------------------------------

    def run(self):
        rng = self.rng
        # Initial data, written before the daemon runs, with `plain` stored in the image as QEMU would.
        commands = []
        for i in range(rng.randrange(8, 24)):
            length = rng.randrange(1, 33) * 64 * KiB
            commands += ["-c", f"write -P 0x{i + 1:02x} {rng.randrange(0, (DISK_SIZE - length) // 512) * 512} {length}"]
        run(["qemu-img", "create", "-q", "-f", "qcow2", self.disk, str(DISK_SIZE)], check=True)
        run(["qemu-io", "-f", "qcow2", self.disk] + commands, check=True)
        run(["qemu-img", "bitmap", "--add", "-g", str(GRANULARITY), self.disk, "plain"], check=True)

        self.start()
        self.base()
        if rng.random() < 0.5:
            # Some history: writes, then a good incremental on one bitmap.
            Writer(self.daemon, guest_commands(rng, rng.randrange(10, 60), 0x20), via_hmp=False).join()
            self.incremental(rng.choice(("cc", "plain")), "pre")
        # Dirty data for the fault's backup to copy.
        Writer(self.daemon, guest_commands(rng, rng.randrange(20, 120), 0x40), via_hmp=rng.random() < 0.3).join()

        self.kind = self.soak.draw(rng)
        self.note(f"kind={self.kind}")
        getattr(self, "fault_" + self.kind.replace("-", "_"))()
        self.verify()

    def backup_choice(self):
        """The bitmap, whether the backup is full (bitmap-mode on-success) or incremental, and its speed."""
        rng = self.rng
        bitmap = rng.choice(("cc", "cc", "plain"))
        full = rng.random() < 0.4
        speed = rng.choice((0, 8 * MiB, 24 * MiB, 64 * MiB))
        self.note(f"bitmap={bitmap} {'full' if full else 'incremental'} speed={speed // MiB}MiB/s")
        return bitmap, full, speed

    def fault_kill(self):
        rng = self.rng
        writes = rng.random() < 0.8
        backup = not writes or rng.random() < 0.6
        writer = None
        expected = 0.3
        if writes:
            via_hmp = rng.random() < 0.3
            writer = Writer(self.daemon, guest_commands(rng, 4000, 0x80), via_hmp)
            self.note(f"writes via {'HMP' if via_hmp else 'NBD'}")
        if backup:
            bitmap, full, speed = self.backup_choice()
            target = self.create_target("killed.qcow2", bitmap, full)
            self.add_target("tk", target)
            self.daemon.command("blockdev-backup", self.backup_arguments("jk", "tk", bitmap, full, speed=speed))
            expected = max(expected, (40 * MiB if full else 12 * MiB) / (speed or 400 * MiB))
        delay = rng.uniform(0.0, min(expected, 2.0))
        time.sleep(delay)
        running = backup and any(j["device"] == "jk" for j in self.daemon.command("query-block-jobs"))
        self.daemon.kill()
        self.note(f"kill after {delay:.3f}s{' (backup running)' if running else ''}")
        self.fault_hit = running or (writer is not None and writer.alive())
        self.crashed = True
        if writer is not None:
            writer.join()
            self.note(f"{writer.acknowledged} writes acknowledged")
        if backup:
            self.check_image(target, leaks_allowed=True)

    def fault_cancel(self):
        rng = self.rng
        bitmap, full, speed = self.backup_choice()
        speed = speed or 16 * MiB
        writer = None
        if rng.random() < 0.5:
            writer = Writer(self.daemon, guest_commands(rng, rng.randrange(20, 200), 0xA0), rng.random() < 0.3)
            self.note("writes during the job")
        target = self.create_target("cancelled.qcow2", bitmap, full)
        self.add_target("tc", target)
        self.daemon.command("blockdev-backup", self.backup_arguments("jc", "tc", bitmap, full, speed=speed))
        time.sleep(rng.uniform(0.0, (40 * MiB if full else 12 * MiB) / speed))
        reply = self.daemon.qmp.execute("block-job-cancel", {"device": "jc"})
        status, error = self.daemon.wait_job("jc")
        self.note(f"cancel: {'sent' if 'return' in reply else reply['error']['desc']}; job {status} {error or ''}")
        self.fault_hit = status == "cancelled"
        if writer is not None:
            writer.join()
        self.end_backup("tc", target, bitmap, full, status, error)

    def end_backup(self, node, target, bitmap, full, status, error):
        self.daemon.command("blockdev-del", {"node-name": node})
        if status == "completed" and not error:
            self.record_success(bitmap, target, full)
            self.check_image(target, leaks_allowed=False)
        else:
            self.check_image(target, leaks_allowed=True)

    def stop_then_cancel(self, job_id):
        """on-target-error=stop pauses the job at the error: cancel it there."""
        def on_error(data):
            if data.get("action") == "stop":
                # execute() queues the events it reads meanwhile, so wait_job still sees them.
                self.daemon.qmp.execute("block-job-cancel", {"device": job_id, "force": True})
        return on_error

    def failing_backup(self, node, bitmap, full, speed, target, inject=None):
        """Runs a backup that a fault should fail, then deletes its target node."""
        action = self.rng.choice(("report", "report", "stop", "enospc"))
        self.note(f"on-target-error={action}")
        self.add_target(node, target, inject)
        self.daemon.command("blockdev-backup", self.backup_arguments(
            "j" + node, node, bitmap, full, speed=speed, **{"on-target-error": action}))
        status, error = self.daemon.wait_job("j" + node, on_error=self.stop_then_cancel("j" + node))
        self.note(f"job {status} {error or ''}")
        self.fault_hit = status == "cancelled" or error is not None
        self.end_backup(node, target, bitmap, full, status, error)

    def fault_eio(self):
        rng = self.rng
        rule = {"event": "write_aio", "errno": rng.choice((5, 5, 28)), "once": rng.random() < 0.5}
        if rng.random() < 0.7:
            # A host offset of the target that the copy is likely to reach.
            rule["sector"] = rng.randrange(0, 24 * MiB // 512)
        self.note(f"inject {json.dumps(rule)}")
        bitmap, full, speed = self.backup_choice()
        target = self.create_target("eio.qcow2", bitmap, full)
        self.failing_backup("te", bitmap, full, speed, target, [rule])

    def fault_enospc(self):
        mount = self.path("tiny")
        os.makedirs(mount)
        size = self.rng.choice((1, 2, 4)) * MiB
        run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], check=True)
        self.mounts.append(mount)
        self.note(f"tmpfs of {size // MiB} MiB")
        bitmap, full, speed = self.backup_choice()
        target = self.create_target("enospc.qcow2", bitmap, full, directory=mount)
        self.failing_backup("ts", bitmap, full, speed, target)

    def fault_nbd_eio(self):
        rng = self.rng
        sock = self.path("nbdkit.sock")
        rate = rng.choice((0.01, 0.1, 1.0))
        nbdkit = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-U", sock, "--filter=error", "memory",
                                   f"size={DISK_SIZE}", f"error-rate={rate}", "error=EIO", "error-pread-rate=0"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock):
                if time.monotonic() > deadline:
                    raise Setup("nbdkit did not start")
                time.sleep(0.02)
            self.note(f"nbdkit error-rate={rate}")
            bitmap, full, speed = self.backup_choice()
            # A raw NBD target holds one full copy; the bitmap's promise is what is checked.
            self.daemon.command("blockdev-add", {"driver": "raw", "node-name": "tn", "file": {
                "driver": "nbd", "server": {"type": "unix", "path": sock}}})
            self.daemon.command("blockdev-backup", self.backup_arguments("jn", "tn", bitmap, full, speed=speed))
            status, error = self.daemon.wait_job("jn")
            self.note(f"job {status} {error or ''}")
            self.fault_hit = error is not None
            self.daemon.command("blockdev-del", {"node-name": "tn"})
            if status == "completed" and not error:
                # The copy went to a scratch target: no image to stack on; the bitmap moved on without one.
                self.chains[bitmap] = None
        finally:
            nbdkit.terminate()
            nbdkit.wait()

    # Checks ------------------------------------------------------------------------------------------------

    def verify(self):
        if self.crashed:
            self.verify_after_crash()
        else:
            self.verify_live()

    def verify_after_crash(self):
        self.check_image(self.disk, leaks_allowed=True)
        for chain in self.chains.values():
            for image in chain or ():
                self.check_image(image, leaks_allowed=False)
        # The disk as the crash left it (read-only open: the image's flags stay as they are).
        at_crash = self.path("at-crash.raw")
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", self.disk, at_crash], check=True)
        self.start()
        bitmaps = self.daemon.bitmaps()
        plain = bitmaps.get("plain")
        if plain is not None and not plain.get("inconsistent"):
            raise Violation(f"after kill -9 the plain persistent bitmap is not inconsistent: {plain}")
        cc = bitmaps.get("cc")
        if cc is None:
            raise Violation("after kill -9 the crash-consistent bitmap is gone")
        if cc.get("inconsistent"):
            raise Violation(f"after kill -9 the crash-consistent bitmap is inconsistent: {cc}")
        inc = self.incremental("cc", "after-crash")
        self.compare(inc, at_crash, "raw", "incremental from cc after kill -9 vs the disk at the crash")
        self.daemon.quit()
        self.check_image(self.disk, leaks_allowed=True)

    def verify_live(self):
        if not self.daemon.alive():
            raise Violation(f"the daemon died: {self.daemon.log_tail()}")
        for bitmap in ("cc", "plain"):
            if self.chains[bitmap] is None:
                continue
            inc = self.incremental(bitmap, "check")
            result = run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", inc, self.daemon.nbd_uri])
            if result.returncode != 0:
                raise Violation(f"incremental from {bitmap} after the fault is not the disk: {result.stdout.strip()[:300]}")
        self.daemon.quit()
        self.check_image(self.disk, leaks_allowed=False)
        for chain in self.chains.values():
            for image in chain or ():
                self.check_image(image, leaks_allowed=False)
        self.start()
        bitmaps = self.daemon.bitmaps()
        for name in ("cc", "plain"):
            b = bitmaps.get(name)
            if b is None or b.get("inconsistent"):
                raise Violation(f"after a clean quit bitmap {name} is {'gone' if b is None else 'inconsistent'}")
        self.daemon.quit()

    def cleanup(self, keep):
        if self.daemon is not None and self.daemon.alive():
            self.daemon.kill()
        for mount in self.mounts:
            subprocess.run(["umount", "-l", mount], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# -- the soak ------------------------------------------------------------------------------------------------

class Soak:
    def __init__(self, args):
        self.seed = args.seed if args.seed is not None else random.randrange(1, 2**31)
        command = shlex.split(args.daemon) if args.daemon else default_daemon()
        # Daemons run in their trial's directory: paths given relative to here must still work there.
        self.command = [os.path.abspath(a) if os.path.exists(a) else a for a in command]
        self.root = tempfile.mkdtemp(prefix="soak-", dir=args.dir)
        self.keep = args.keep
        self.kinds = self.usable_kinds(args.kinds)

    def usable_kinds(self, wanted):
        kinds = [k for k in (wanted or KINDS)]
        if "enospc" in kinds and os.geteuid() != 0:
            print("soak: not root: the tmpfs ENOSPC kind is skipped (blkdebug still injects ENOSPC)", flush=True)
            kinds.remove("enospc")
        if "nbd-eio" in kinds and not (shutil.which("nbdkit") and self.has_nbd_driver()):
            print("soak: backupd has no nbd block driver (or nbdkit is missing): the nbdkit error-filter kind is "
                  "skipped; EIO and ENOSPC come from blkdebug", flush=True)
            kinds.remove("nbd-eio")
        if not kinds:
            sys.exit("soak: no fault kind can run here")
        return kinds

    def has_nbd_driver(self):
        probe = os.path.join(self.root, "probe")
        os.makedirs(probe)
        sock = os.path.join(probe, "qmp.sock")
        with open(os.path.join(probe, "daemon.log"), "w") as log:
            process = subprocess.Popen(self.command + ["--chardev", f"socket,id=m,path={sock},server=on,wait=off",
                                                       "--monitor", "chardev=m"],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            qmp = QmpClient(sock)
            try:
                qmp.connect(timeout=60, alive=lambda: process.poll() is None)
                schema = qmp.command("query-qmp-schema")
                qmp.execute("quit")
            finally:
                qmp.close()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        shutil.rmtree(probe, ignore_errors=True)
        return any(entry.get("meta-type") == "enum" and "nbd" in entry.get("values", ())
                   and "qcow2" in entry.get("values", ()) for entry in schema)

    def draw(self, rng):
        return rng.choices(self.kinds, weights=[WEIGHTS[k] for k in self.kinds])[0]


def default_daemon():
    builds = [os.path.join(REPO, "src/Backup.Daemon/bin", cfg, "net10.0/backupd.dll") for cfg in ("Release", "Debug")]
    built = [b for b in builds if os.path.exists(b)]
    if not built:
        sys.exit("soak: backupd is not built (dotnet build -c Release src/Backup.Daemon); or pass --daemon")
    return ["dotnet", max(built, key=os.path.getmtime)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    parser.add_argument("--seed", type=int, help="the run's seed (default: random, printed)")
    parser.add_argument("--start", type=int, default=1,
                        help="number of the first trial (default 1): runs with one seed can share out trial numbers")
    parser.add_argument("--only", type=int, action="append", help="run only this trial number (repeatable)")
    parser.add_argument("--daemon", help="the daemon's command, e.g. 'dotnet /path/backupd.dll' "
                                         "(default: the newest build in this checkout)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, help="fault kinds to draw from (default: all that can run)")
    parser.add_argument("--dir", help="where trial directories go (default: the system's temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep every trial's directory (a failed one is always kept)")
    parser.add_argument("--time-limit", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--verbose", action="store_true", help="print each trial's story")
    args = parser.parse_args()

    # A runner's SIGTERM (a test timeout) unwinds like Ctrl-C, so the trial's daemon and mounts are cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    soak = Soak(args)
    numbers = args.only or range(args.start, args.start + args.trials)
    print(f"soak: seed={soak.seed} daemon={shlex.join(soak.command)} kinds={','.join(soak.kinds)} dir={soak.root}",
          flush=True)
    started = time.monotonic()
    violations = []
    errors = []
    mix = collections.Counter()
    hit = collections.Counter()
    done = 0
    for number in numbers:
        if args.time_limit and time.monotonic() - started > args.time_limit:
            print(f"soak: time limit reached after {done} trials", flush=True)
            break
        trial = Trial(soak, number)
        failed = False
        try:
            trial.run()
        except KeyboardInterrupt:
            # Stopped from outside (Ctrl-C, SIGTERM): this trial does not count; report what ran.
            print(f"soak: interrupted during trial {number}", flush=True)
            break
        except Violation as e:
            failed = True
            violations.append((number, trial, str(e)))
        except Setup as e:
            failed = True
            errors.append((number, trial, str(e)))
        except Exception as e:  # noqa: BLE001 - a harness bug is reported with its trial, not hidden
            failed = True
            errors.append((number, trial, f"{type(e).__name__}: {e}"))
        finally:
            trial.cleanup(keep=soak.keep or failed)
        done += 1
        mix[trial.kind or "setup"] += 1
        hit[trial.kind or "setup"] += trial.fault_hit
        if done % 50 == 0 and not args.verbose:
            print(f"soak: {done} trials, {len(violations)} violations, {time.monotonic() - started:.0f}s", flush=True)
        if args.verbose or failed:
            print(f"trial {number} ({time.monotonic() - trial.started:.1f}s): {'; '.join(trial.story)}{' -> FAILED' if failed else ''}", flush=True)
    duration = time.monotonic() - started
    for number, trial, text in violations:
        print(f"VIOLATION seed={soak.seed} trial={number} ({'; '.join(trial.story)}): {text}\n"
              f"  replay: {sys.argv[0]} --seed {soak.seed} --only {number} --keep   (kept: {trial.dir})", flush=True)
    for number, trial, text in errors:
        print(f"HARNESS ERROR seed={soak.seed} trial={number} ({'; '.join(trial.story)}): {text}", flush=True)
    print("soak: mix " + ", ".join(f"{k}={mix[k]} (fault hit {hit[k]})" for k in sorted(mix)), flush=True)
    print(f"soak: duration={duration:.1f}s", flush=True)
    print(f"soak: trials={done} violations={len(violations)} seed={soak.seed}", flush=True)
    if not soak.keep and not violations and not errors:
        shutil.rmtree(soak.root, ignore_errors=True)
    sys.exit(1 if violations or errors else 0)


if __name__ == "__main__":
    main()
