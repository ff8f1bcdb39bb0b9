"""One owner for a network namespace's tables.

Two `tcprouter run` on one host (two sidecars, or a sidecar and a host service) would each remove what the
other wrote and flap. The owner holds a lock that lives exactly as long as its process: an abstract UNIX
socket (`@tcprouter-tables`), bound in the network namespace whose tables it writes. Abstract names are per
network namespace, so every process of the host's network (a service, or containers with `network_mode:
host`) contends for the same name whatever its filesystem, and the kernel frees it the instant the owner
dies, by any signal, with no stale lock file to clear. `ss -xlp | grep tcprouter-tables` names the owner.
"""

from __future__ import annotations

import errno
import socket
import threading

LOCK_NAME = "tcprouter-tables"


class TablesLock:
    """The owner's lock. `acquire()` tries once; `wait()` blocks until it is ours or the daemon stops."""

    def __init__(self, name: str = LOCK_NAME, poll_interval: float = 0.1) -> None:
        self.address = "\0" + name
        self.name = name
        self.poll_interval = poll_interval  # a bind() every 100 ms: the takeover lag, at no measurable cost
        self._socket: socket.socket | None = None

    @property
    def holder_hint(self) -> str:
        """How an operator finds the process that holds the lock."""
        return f"it holds the abstract socket @{self.name}: `ss -xlp | grep {self.name}` names it"

    @property
    def held(self) -> bool:
        return self._socket is not None

    def acquire(self) -> bool:
        """Take the lock if no other process holds it."""
        if self._socket is not None:
            return True
        candidate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            candidate.bind(self.address)
        except OSError as error:
            candidate.close()
            if error.errno == errno.EADDRINUSE:
                return False
            raise
        self._socket = candidate
        return True

    def wait(self, stopping: threading.Event) -> bool:
        """Block until the lock is ours (True) or `stopping` is set (False)."""
        while not self.acquire():
            if stopping.wait(self.poll_interval):
                return False
        return True

    def release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
