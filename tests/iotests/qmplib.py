"""A small QMP client: Python 3 standard library only.

One Unix socket, read on the caller's thread (no reader thread): a command is
sent with an id and lines are read until the reply carrying that id arrives;
events read meanwhile are queued in arrival order, so none is lost or taken
for a reply.  `wait_event` takes the first queued event that matches, reading
more with a deadline when none does.
"""

import json
import select
import socket
import time


class QmpError(Exception):
    """A command's error reply, kept whole: `error` is {"class": ..., "desc": ...}."""

    def __init__(self, command, error):
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")
        self.command = command
        self.error = error


class QmpTimeout(Exception):
    pass


class QmpClosed(Exception):
    pass


def matches(data, pattern):
    """True when every key of `pattern` is in `data` with an equal value (dicts recursively)."""
    if pattern is None:
        return True
    if not isinstance(data, dict):
        return False
    for key, want in pattern.items():
        if key not in data:
            return False
        if isinstance(want, dict):
            if not matches(data[key], want):
                return False
        elif data[key] != want:
            return False
    return True


class QmpClient:
    def __init__(self, path):
        self.path = path
        self.greeting = None
        self.events = []
        self._sock = None
        self._buffer = b""
        self._next_id = 0

    def connect(self, timeout=30.0, negotiate=True, alive=lambda: True):
        """Connects (retrying while the daemon is still binding its socket), reads the greeting,
        and negotiates capabilities unless told not to."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                break
            except OSError as e:
                sock.close()
                if not alive():
                    raise QmpClosed(f"daemon exited before {self.path} accepted") from e
                if time.monotonic() > deadline:
                    raise QmpTimeout(f"cannot connect to {self.path}: {e}") from e
                time.sleep(0.02)
        self._sock = sock
        self.greeting = self._read_message(deadline)
        if "QMP" not in self.greeting:
            raise QmpClosed(f"not a QMP greeting: {self.greeting!r}")
        if negotiate:
            self.command("qmp_capabilities")
        return self.greeting

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- wire ---------------------------------------------------------------

    def _read_message(self, deadline):
        """The next JSON message, waiting until `deadline` (monotonic seconds)."""
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpTimeout("no message from the daemon in time")
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                continue
            chunk = self._sock.recv(65536)
            if not chunk:
                raise QmpClosed("the daemon closed the QMP connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        if not line.strip():
            return self._read_message(deadline)
        return json.loads(line)

    def send(self, message):
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    # -- commands -----------------------------------------------------------

    def execute(self, command, arguments=None, timeout=60.0):
        """Sends one command and returns its whole reply ({"return": ...} or {"error": ...})."""
        self._next_id += 1
        request_id = f"iotest-{self._next_id}"
        message = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        self.send(message)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == request_id:
                del reply["id"]
                return reply
            else:
                raise QmpClosed(f"reply to another request: {reply!r}")

    def command(self, command, arguments=None, timeout=60.0):
        """Like execute, but returns the value and raises QmpError on an error reply."""
        reply = self.execute(command, arguments, timeout)
        if "error" in reply:
            raise QmpError(command, reply["error"])
        return reply["return"]

    # -- events -------------------------------------------------------------

    def wait_event_any(self, timeout=60.0):
        """Removes and returns the oldest event, reading one with a deadline when none is queued."""
        if self.events:
            return self.events.pop(0)
        message = self._read_message(time.monotonic() + timeout)
        if "event" not in message:
            raise QmpClosed(f"unrequested reply: {message!r}")
        return message

    def wait_event(self, name, data=None, timeout=60.0):
        """Removes and returns the first queued event named `name` whose data contains `data`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name and matches(event.get("data", {}), data):
                    return self.events.pop(i)
            if time.monotonic() >= deadline:
                raise QmpTimeout(f"no {name} {data or ''} event within {timeout} s")
            message = self._read_message(deadline)
            if "event" not in message:
                raise QmpClosed(f"unrequested reply: {message!r}")
            self.events.append(message)

    def take_events(self):
        """Removes and returns every queued event."""
        taken, self.events = self.events, []
        return taken
