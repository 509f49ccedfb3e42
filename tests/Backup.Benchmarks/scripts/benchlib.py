"""What the benchmark scripts share: where the backupd to measure is, and a minimal QMP client.
Standard library only; the scripts import it from their own directory."""

import json
import os
import socket

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "../../.."))
PUBLISHED = os.path.join(ROOT, "src/Backup.Daemon/bin/Release/net10.0/linux-x64/publish/backupd")
RELEASE_DLL = os.path.join(ROOT, "src/Backup.Daemon/bin/Release/net10.0/backupd.dll")


def default_backupd():
    """$BACKUPD, else the published native binary when it is there, else the Release build's backupd.dll."""
    return os.environ.get("BACKUPD", PUBLISHED if os.path.exists(PUBLISHED) else RELEASE_DLL)


def command_for(path):
    return ["dotnet", path] if path.endswith(".dll") else [path]


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
