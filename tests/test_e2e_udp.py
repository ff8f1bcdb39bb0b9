"""End to end, UDP: real containers answering datagrams, real kernel rules and conntrack on this host, a client
namespace sending from its own flows (a socket each)."""

from __future__ import annotations

import time

import pytest

from tcprouter.compiler import DEFAULT_MARK_BIT

from .support import BACKEND_PORT, greetings, owned_rules_in_host, sh, udp_ask, udp_flow, udp_greetings, wait_until

pytestmark = pytest.mark.e2e
COAP = 5683


def udp_pool(backends, count: int, **labels: str) -> tuple[list, list[str]]:
    """`count` backends of the UDP frontend COAP (more labels with `labels`), each answering datagrams."""
    containers = [backends.start({"udp.port": str(COAP), **labels}) for _ in range(count)]
    ips = [backends.ip(c) for c in containers]
    for ip in ips:  # the TCP greeter is up (Backends.start waited for it); the UDP one starts beside it
        wait_until(lambda ip=ip: _answers(ip), 5, what=f"{ip} answering datagrams")
    return containers, ips


def _answers(ip: str) -> bool:
    with udp_flow(None) as flow:
        try:
            return udp_ask(flow, ip, BACKEND_PORT, 0.2) == ip
        except TimeoutError:
            return False


def flows_to(ip: str) -> list[str]:
    """The host's UDP conntrack entries of routed flows (tcprouter's mark) whose replies come from `ip` (a backend's
    flows through the frontend; the tests' own probes straight to the backend are not routed)."""
    mark = f"{DEFAULT_MARK_BIT:#x}/{DEFAULT_MARK_BIT:#x}"
    return sh("conntrack", "-L", "-p", "udp", "--reply-src", ip, "--mark", mark, check=False).splitlines()


def test_udp_pool_rotates_over_new_flows_and_a_flow_keeps_its_backend(backends, start_router, client_host):
    _, ips = udp_pool(backends, 3)
    start_router()
    ns, host = client_host.name, client_host.host_ip
    assert udp_greetings(ns, host, COAP, 6) == ips + ips  # strict rotation, one step per new flow
    with udp_flow(ns) as flow:
        first = udp_ask(flow, host, COAP)
        assert [udp_ask(flow, host, COAP) for _ in range(5)] == [first] * 5
        assert udp_greetings(ns, host, COAP, 3) == ips[1:] + ips[:1]  # other flows went on rotating meanwhile


def kill_and_follow(containers, ips, client_host, flow, signal: str, timeout: float) -> tuple[str, str | None, float]:
    """Send `signal` to the backend `flow` is on; ask on the same flow until another backend answers or `timeout`
    passes. Returns the signalled backend's address, the one that answered (None: none did), and when (s after)."""
    host = client_host.host_ip
    first = udp_ask(flow, host, COAP)
    containers[ips.index(first)].get_wrapped_container().kill(signal=signal)
    signalled = time.monotonic()
    while time.monotonic() - signalled < timeout:
        try:
            answer = udp_ask(flow, host, COAP, 0.05)
        except TimeoutError:
            continue
        if answer != first:
            return first, answer, time.monotonic() - signalled
    return first, None, timeout


def test_a_flow_of_a_killed_backend_goes_to_another_within_a_second(backends, start_router, client_host):
    containers, ips = udp_pool(backends, 3)
    start_router()
    with udp_flow(client_host.name) as flow:
        killed, answer, after = kill_and_follow(containers, ips, client_host, flow, "SIGKILL", 3)
        assert answer in set(ips) - {killed}, f"no other backend answered within 3s (killed {killed})"
        assert after <= 1.0
        assert flows_to(killed) == []


@pytest.mark.parametrize("keep_flows", [False, True], ids=["deleted", "kept"])
def test_a_flow_leaves_a_stopping_backend_only_when_its_entry_is_deleted(
    backends, start_router, client_host, host_tables, keep_flows
):
    """A stop signal takes a backend out of the rotation while it still runs (this one ignores SIGTERM, as a
    server finishing its work would). Docker purges a container's UDP conntrack entries only once it is gone: until
    then the flow's entry keeps it on that backend, unless tcprouter deletes it (not with --keep-flows)."""
    containers, ips = udp_pool(backends, 3)
    start_router(*(["--keep-flows"] if keep_flows else []))
    try:
        with udp_flow(client_host.name) as flow:
            stopping, answer, after = kill_and_follow(containers, ips, client_host, flow, "SIGTERM", 2)
            assert not any(f"{stopping}:" in rule for rule in owned_rules_in_host(host_tables))  # out of rotation
            if keep_flows:
                assert answer is None
                assert udp_ask(flow, client_host.host_ip, COAP) == stopping  # the flow is still on it
                assert flows_to(stopping)
            else:
                assert answer in set(ips) - {stopping}, f"the flow stayed on {stopping} for 2s"
                assert after <= 1.0
                assert flows_to(stopping) == []
    finally:
        for container in containers:  # SIGTERM is ignored: no 10-second stop at teardown
            container.get_wrapped_container().kill()


def test_tcp_and_udp_frontends_on_one_port_are_independent(backends, start_router, client_host):
    """Pools by protocol: TCP-only, UDP-only and both-labelled containers on port COAP; removing the UDP-only one
    changes the UDP rotation and nothing of the TCP one."""
    tcp_only = backends.start({"tcp.port": str(COAP)})
    [udp_only], [udp_ip] = udp_pool(backends, 1)
    _, [both_ip] = udp_pool(backends, 1, **{"tcp.port": str(COAP)})
    tcp_ip = backends.ip(tcp_only)
    start_router()
    ns, host = client_host.name, client_host.host_ip
    assert greetings(ns, host, COAP, 4) == [tcp_ip, both_ip] * 2
    assert udp_greetings(ns, host, COAP, 4) == [udp_ip, both_ip] * 2

    backends.remove(udp_only)

    def udp_pool_is_both_only() -> bool:
        try:
            return udp_greetings(ns, host, COAP, 2, timeout=0.2) == [both_ip] * 2
        except TimeoutError:
            return False

    wait_until(udp_pool_is_both_only, 5, what="the UDP pool without it")
    assert greetings(ns, host, COAP, 4) == [tcp_ip, both_ip] * 2
