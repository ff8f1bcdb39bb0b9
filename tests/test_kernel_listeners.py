"""The host listener scan by netlink sock_diag, against real sockets (in the test's namespace and a private one)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tcprouter import hostports

from .support import in_netns, private_netns, sh

pytestmark = pytest.mark.kernel


def _listening(family: socket.AddressFamily, address: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, 0))
    sock.listen(8)
    return sock


def _scan_with(opened: list[tuple[socket.AddressFamily, str]], scan: Callable[[], dict[int, str]]) -> dict:
    """Open listeners, a connected pair and a bound socket that does not listen; scan; close them all."""
    sockets = [_listening(family, address) for family, address in opened]
    try:
        client = socket.create_connection(("127.0.0.1", sockets[0].getsockname()[1])) if opened else None
        served = sockets[0].accept()[0] if client else None
        idle = socket.socket()
        idle.bind(("0.0.0.0", 0))  # bound, never listening: not a listener
        try:
            found = scan()
            ports = {"listening": [s.getsockname()[1] for s in sockets], "idle": idle.getsockname()[1]}
            ports["client"] = client.getsockname()[1] if client else None
            return {"found": found, **ports}
        finally:
            for sock in (client, served, idle):
                if sock:
                    sock.close()
    finally:
        for sock in sockets:
            sock.close()


OPENED = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]


@pytest.mark.parametrize("loopback", [False, True])
def test_netlink_finds_the_listeners_of_both_families_only(loopback):
    with private_netns() as ns:
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        result = in_netns(ns, lambda: _scan_with(OPENED, lambda: hostports.netlink_listeners(loopback)))
    local, wildcard, wildcard6 = result["listening"]
    expected = {wildcard: "0.0.0.0", wildcard6: "::", **({local: "127.0.0.1"} if loopback else {})}
    assert result["found"] == expected  # the connected pair and the bound socket are not listed
    assert result["idle"] not in result["found"] and result["client"] not in result["found"]


@pytest.mark.parametrize("loopback", [False, True])
def test_netlink_and_proc_agree_in_the_test_namespace(loopback):
    """Against the host's namespace (real listeners of the host besides the test's own)."""
    result = _scan_with(OPENED, lambda: (hostports.netlink_listeners(loopback), hostports.proc_listeners(loopback)))
    by_netlink, by_proc = result["found"]
    assert by_netlink == by_proc
    assert result["listening"][1] in by_netlink


def test_an_empty_namespace_has_no_listeners():
    with private_netns() as ns:
        assert in_netns(ns, hostports.netlink_listeners) == {}
