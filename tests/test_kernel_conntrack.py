"""Deleting the conntrack entries of backends that left, against a real conntrack table (a private namespace's)."""

from __future__ import annotations

import pytest

from tcprouter.conntrack import forget_flows
from tcprouter.model import Protocol

from .support import in_netns, private_netns, sh

pytestmark = pytest.mark.kernel
MARK = 0x100000


def insert(ns: str, protocol: str, backend: str, client_port: int, mark: int) -> None:
    """An entry as a DNATed flow leaves it: client -> host:5683, replies from backend:1234."""
    sh(
        "ip", "netns", "exec", ns, "conntrack", "-I", "-p", protocol,
        "-s", "198.51.100.2", "-d", "192.0.2.1", "--sport", str(client_port), "--dport", "5683",
        "-r", backend, "-q", "198.51.100.2", "--reply-port-src", "1234", "--reply-port-dst", str(client_port),
        "-t", "100", "-m", str(mark),
        *(["--state", "ESTABLISHED"] if protocol == "tcp" else []),
    )  # fmt: skip


def entries(ns: str) -> list[str]:
    return sh("ip", "netns", "exec", ns, "conntrack", "-L", check=False).splitlines()


def test_only_the_marked_flows_of_the_protocol_from_the_endpoints_that_left_are_deleted():
    with private_netns() as ns:
        for port in range(40000, 40050):
            insert(ns, "udp", "10.9.0.2", port, MARK)  # the backend that left: these go
            insert(ns, "udp", "10.9.0.3", port + 100, MARK)  # another backend of the pool: kept
        insert(ns, "udp", "10.9.0.2", 41000, 0)  # not routed by tcprouter (no mark): kept
        insert(ns, "tcp", "10.9.0.2", 41001, MARK)  # TCP: another protocol, kept
        assert in_netns(ns, lambda: forget_flows(Protocol.UDP, {("10.9.0.2", 1234)}, MARK)) == 50
        left = entries(ns)
        assert len(left) == 52 and not any("udp" in e and "src=10.9.0.2" in e and "mark=0" not in e for e in left)
        assert in_netns(ns, lambda: forget_flows(Protocol.UDP, {("10.9.0.2", 1234)}, MARK)) == 0  # nothing left
        assert in_netns(ns, lambda: forget_flows(Protocol.TCP, {("10.9.0.2", 1234), ("10.9.0.3", 1234)}, MARK)) == 1
