"""Conntrack entries of backends that left, deleted with the `conntrack` tool (the kernel's conntrack netlink).

A UDP flow has no end the kernel can see: its entry keeps sending the client's datagrams to the backend it was
dispatched to until the entry times out (30 s after the last datagram, or 120 s for a stream), even when that
backend is gone and the DNAT rule that chose it was removed. Deleting the entry makes the client's next datagram
a new flow, which the frontend's rules dispatch afresh. The same is done for the TCP connections of a backend
that is gone (sync.stale_flows decides which), so that a client's next segment is answered by a reset at once.

Why the tool and not a netlink library: the kernel filters the dump by reply source and mark either way, but
pyroute2 parses each entry in Python (~0.4 ms each: 1,000 entries of a busy UDP backend, 0.4 s of the sync thread),
where `conntrack -D` deletes them in ~30 ms.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Collection

from .model import Protocol

Endpoint = tuple[str, int]
_DELETED = re.compile(r"([0-9]+) flow entries have been deleted")
TIMEOUT = 10.0


def forget_flows(protocol: Protocol, endpoints: Collection[Endpoint], mark_bit: int) -> int:
    """Delete the entries of routed flows (their connection mark has `mark_bit`) of `protocol` whose replies come
    from one of `endpoints` (a backend's address and port, as its DNAT rule named them). Returns how many went.

    Raises OSError if the tool is missing or fails (a timeout is one).
    """
    deleted = 0
    for address, port in sorted(endpoints):
        family = ["-f", "ipv6"] if ":" in address else []
        command = [
            "conntrack", "-D", *family, "-p", str(protocol),
            "--reply-src", address, "--reply-port-src", str(port),
            "--mark", f"{mark_bit:#x}/{mark_bit:#x}",
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired as error:
            raise OSError(f"{' '.join(command)} took more than {TIMEOUT:g} s") from error
        # It exits 1 when nothing matched, and says how many it deleted either way.
        counted = _DELETED.search(done.stderr)
        if counted is None:
            raise OSError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
        deleted += int(counted.group(1))
    return deleted
