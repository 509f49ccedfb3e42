"""What every iotest script shares: the daemon, guest I/O, images, and the transcript.

A test prints its transcript on stdout with `log`; `check` compares it with the
golden `.out` file.  The same transcript must come out of backupd and of
qemu-storage-daemon, so everything logged goes through `normalise`: the scratch
directory becomes $TEST_DIR, generated node names lose their number, and
timestamps never reach the log.  What legitimately differs between the two
daemons (timing, raw event interleaving between jobs) is not logged at all.

Environment (set by `check`):
  IOTEST_DAEMON  the daemon's command, split like a shell would
                 (default: the backupd built in this checkout)
  IOTEST_DIR     an empty scratch directory for this test
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

from qmplib import QmpClient, QmpError, QmpTimeout

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TEST_DIR = os.environ.get("IOTEST_DIR") or "/tmp/iotests-manual"
os.makedirs(TEST_DIR, exist_ok=True)

# Guest clusters, dirty-bitmap granularity and backup chunk: one unit, as in most of QEMU's tests.
CLUSTER = 64 * 1024


def default_daemon():
    """backupd as built in this checkout (the newest of Debug and Release)."""
    builds = [os.path.join(REPO, "src/Backup.Daemon/bin", cfg, "net10.0/backupd.dll") for cfg in ("Debug", "Release")]
    built = [b for b in builds if os.path.exists(b)]
    if not built:
        sys.exit("iotest: backupd is not built (dotnet build src/Backup.Daemon), and IOTEST_DAEMON is not set")
    return ["dotnet", max(built, key=os.path.getmtime)]


def daemon_command():
    given = os.environ.get("IOTEST_DAEMON")
    return shlex.split(given) if given else default_daemon()


# -- the transcript ----------------------------------------------------------

_GENERATED_NODE = re.compile(r"#block[0-9]+")


def normalise(text):
    """The parts of a line that differ from run to run or daemon to daemon, made equal."""
    text = text.replace(TEST_DIR, "$TEST_DIR")
    return _GENERATED_NODE.sub("#blockNNN", text)


def _sorted_json(value):
    return json.dumps(value, sort_keys=True)


def log(value=""):
    """One transcript line: text as is, anything else as JSON with sorted keys."""
    text = value if isinstance(value, str) else _sorted_json(value)
    print(normalise(text), flush=True)


def section(title):
    log("")
    log(f"=== {title} ===")


def check(condition, what):
    """An assertion that the transcript shows: a wrong value changes the line, so the test fails."""
    log(f"{what}: {'OK' if condition else 'FAILED'}")
    return condition


# -- images and guest data ------------------------------------------------------

def path(name):
    return os.path.join(TEST_DIR, name)


def run(argv, logged=False):
    """Runs a tool; its output (normalised) goes to the transcript when `logged`."""
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if logged:
        for line in result.stdout.splitlines():
            log(line)
    return result


def qemu_img(*args, logged=False):
    result = run(["qemu-img", *args], logged)
    if result.returncode not in (0, 1) or (result.returncode == 1 and args[0] != "compare"):
        raise RuntimeError(f"qemu-img {' '.join(args)} failed: {result.stdout}")
    return result


def create_image(name, size="64M", fmt="qcow2", backing=None, backing_fmt=None):
    args = ["create", "-q", "-f", fmt]
    if backing:
        args += ["-b", path(backing), "-F", backing_fmt or "raw"]
    qemu_img(*args, path(name), *([size] if not backing else []))
    return path(name)


def compare(image, reference, image_fmt="qcow2", reference_fmt="raw"):
    """qemu-img compare, logged as its verdict: 'Images are identical.' or where they differ."""
    log(f"compare {os.path.basename(image)} with {os.path.basename(reference)}:")
    qemu_img("compare", "-f", image_fmt, "-F", reference_fmt, image, reference, logged=True)


_QEMU_IO_TIMING = re.compile(r"^(\S+ \S*, \d+ ops); .*$")


def qemu_io_output(text):
    """qemu-io's output without its timing line's figures."""
    return [_QEMU_IO_TIMING.sub(r"\1; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)", line) for line in text.splitlines()]


# -- the daemon ---------------------------------------------------------------

def blkdebug(image, inject=(), set_state=()):
    """A blkdebug node's options over `image` (options of another node, or its name)."""
    options = {"driver": "blkdebug", "image": image}
    if inject:
        options["inject-error"] = list(inject)
    if set_state:
        options["set-state"] = list(set_state)
    return options


def qcow2_file(filename, node_name=None, file_wrapper=None):
    """qcow2 over a file node; `file_wrapper` (e.g. a blkdebug) may sit between them."""
    file_node = {"driver": "file", "filename": filename}
    options = {"driver": "qcow2", "file": file_wrapper(file_node) if file_wrapper else file_node}
    if node_name:
        options["node-name"] = node_name
    return options


class Daemon:
    """One daemon (backupd or qemu-storage-daemon) started with QSD's command line: a QMP monitor on
    a Unix socket and an NBD server; each guest disk is exported so that qemu-io can write to it."""

    def __init__(self, name="daemon"):
        self.name = name
        self.qmp_socket = path(f"{name}-qmp.sock")
        self.nbd_socket = path(f"{name}-nbd.sock")
        self.blockdevs = []
        self.exports = []
        self.process = None
        self.client = None
        self._stderr = None

    # Start-up ---------------------------------------------------------------

    def add_blockdev(self, options):
        self.blockdevs.append(options)
        return self

    def add_export(self, node):
        self.exports.append(node)
        return self

    def launch(self):
        argv = daemon_command()
        for options in self.blockdevs:
            argv += ["--blockdev", json.dumps(options)]
        argv += ["--chardev", f"socket,id=mon0,path={self.qmp_socket},server=on,wait=off",
                 "--monitor", "chardev=mon0",
                 "--nbd-server", f"addr.type=unix,addr.path={self.nbd_socket}"]
        for node in self.exports:
            argv += ["--export", f"type=nbd,id=export-{node},node-name={node},name={node},writable=on"]
        self._stderr = open(path(f"{self.name}.stderr"), "w")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                                        cwd=TEST_DIR)
        self.client = QmpClient(self.qmp_socket)
        self.client.connect(alive=lambda: self.process.poll() is None)
        return self

    def shutdown(self):
        """quit, then the process must end by itself."""
        if self.process is None:
            return
        try:
            self.client.execute("quit")
        except Exception:
            pass
        self.client.close()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
            log(f"{self.name} did not exit after quit")
        if code != 0:
            log(f"{self.name} exited with status {code}")
        self.process = None
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            if exc[0] is not None:
                self.process.kill()
                self.process.wait()
                self.process = None
            else:
                self.shutdown()

    # QMP -----------------------------------------------------------------------

    def qmp(self, command, arguments=None, logged=True, timeout=60.0):
        """Executes a command; logs it and its reply unless told not to. Returns the whole reply."""
        if logged:
            log({"execute": command, "arguments": arguments} if arguments else {"execute": command})
        reply = self.client.execute(command, arguments, timeout)
        if logged:
            log(reply)
        return reply

    def command(self, command, arguments=None):
        """A command that must succeed, not logged: its value."""
        return self.client.command(command, arguments)

    def quiet(self, command, arguments=None):
        """A command whose success is not logged; an error is, and the test goes on (so a missing
        feature shows as one added line, not as a test that stops)."""
        reply = self.client.execute(command, arguments)
        if "error" in reply:
            log(f"{command} failed: {reply['error'].get('desc')}")
            return None
        return reply["return"]

    def bitmaps(self, node):
        """The node's named dirty bitmaps, by name (nameless ones, a job's, are left out)."""
        for info in self.command("query-named-block-nodes", {"flat": True}):
            if info["node-name"] == node:
                return {b["name"]: b for b in info.get("dirty-bitmaps", []) if b.get("name")}
        raise KeyError(node)

    def bitmap_count(self, node, name):
        return self.bitmaps(node)[name]["count"]

    # Jobs ----------------------------------------------------------------------

    def run_jobs(self, job_ids, timeout=60.0, on_event=None, mask=()):
        """Waits until every job has gone (status null), then logs each job's story in the order given:
        its statuses (a `paused` straight followed by `running` is the daemon draining, not a pause,
        and is left out), then its BLOCK_JOB_* events' data.  `mask` names data keys whose values are
        timing-dependent for this test (logged as their type).  `on_event(event)` sees each event
        as it comes, for tests that act on one (resume after an error)."""
        stories = {job: [] for job in job_ids}
        gone = set()
        # A job the daemon refused to start would be waited for in vain: the reply to query-jobs comes
        # after every event already sent, so a job that has come and gone is in the queue.
        running = {job["id"] for job in self.command("query-jobs")}
        queued = {e.get("data", {}).get("id") for e in self.client.events if e["event"] == "JOB_STATUS_CHANGE"}
        for job in job_ids:
            if job not in running and job not in queued:
                log(f"job {job}: no such job")
                gone.add(job)
        deadline = time.monotonic() + timeout
        while gone != set(job_ids):
            try:
                event = self._next_event(deadline)
            except TimeoutError:
                log(f"jobs {sorted(set(job_ids) - gone)} did not end within {timeout} s")
                break
            data = event.get("data", {})
            job = data.get("id") if event["event"] == "JOB_STATUS_CHANGE" else data.get("device")
            if job not in stories:
                continue
            if event["event"] == "JOB_STATUS_CHANGE":
                stories[job].append(data["status"])
                if data["status"] == "null":
                    gone.add(job)
            else:
                shown = {k: (type(v).__name__ if k in mask else v) for k, v in data.items()}
                stories[job].append({event["event"]: shown})
            if on_event:
                on_event(event)
        for job in job_ids:
            if not stories[job]:
                continue
            log(f"job {job}:")
            for entry in _without_drains(stories[job]):
                log(f"  {entry if isinstance(entry, str) else _sorted_json(entry)}")

    def run_job(self, job_id, **kwargs):
        self.run_jobs([job_id], **kwargs)

    def _next_event(self, deadline):
        if self.client.events:
            return self.client.events.pop(0)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("job did not end in time")
        try:
            return self.client.wait_event_any(left)
        except QmpTimeout as e:
            raise TimeoutError(str(e)) from e

    # Guest I/O through the NBD export -------------------------------------------

    def nbd_uri(self, node):
        return f"nbd+unix:///{node}?socket={self.nbd_socket}"

    def io(self, node, *commands, logged=True):
        """Runs qemu-io commands on the exported disk, as the guest would write; logs them and what
        qemu-io said."""
        argv = ["qemu-io", "-f", "raw", self.nbd_uri(node)]
        for c in commands:
            argv += ["-c", c]
        result = run(argv)
        if logged:
            for c in commands:
                log(f"qemu-io {node}: {c}")
            for line in qemu_io_output(result.stdout):
                log(f"  {line}")
        if result.returncode != 0:
            log(f"qemu-io exited with status {result.returncode}")
        return result

    def snapshot(self, node, name):
        """A raw copy of the exported disk as it is now (the guest must be quiet)."""
        target = path(name)
        result = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", self.nbd_uri(node), target])
        if result.returncode != 0:
            raise RuntimeError(f"snapshot of {node} failed: {result.stdout}")
        return target


def _without_drains(story):
    """The story without the pause/resume pairs of drained sections; a pause after an error that
    stopped the job is real and stays."""
    out = []
    i = 0
    while i < len(story):
        stopped_by_error = i > 0 and isinstance(story[i - 1], dict) and \
            story[i - 1].get("BLOCK_JOB_ERROR", {}).get("action") == "stop"
        if story[i] == "paused" and i + 1 < len(story) and story[i + 1] == "running" and not stopped_by_error:
            i += 2
            continue
        out.append(story[i])
        i += 1
    return out


class DirtyModel:
    """What a dirty bitmap of CLUSTER granularity should hold: the set of dirty cluster indexes."""

    def __init__(self):
        self.bits = set()

    @staticmethod
    def clusters(offset, length):
        return set(range(offset // CLUSTER, (offset + length - 1) // CLUSTER + 1))

    def dirty(self, offset, length):
        self.bits |= self.clusters(offset, length)

    def clear(self):
        self.bits = set()

    @property
    def count(self):
        return len(self.bits) * CLUSTER

    def verify(self, daemon, node, name):
        """Logs the bitmap's count and whether it equals the model's."""
        have = daemon.bitmap_count(node, name)
        log(f"bitmap {name}: count {have}, model {self.count}: {'OK' if have == self.count else 'MISMATCH'}")
        return have == self.count


__all__ = ["CLUSTER", "Daemon", "DirtyModel", "QmpError", "blkdebug", "check", "compare", "create_image", "log",
           "path", "qcow2_file", "qemu_img", "section"]
