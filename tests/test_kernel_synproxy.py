"""SYN-flood protection in the real kernel, in private network namespaces (the lab of test_kernel_perimeter).

What this shows (issue 11): SYNPROXY and tcprouter's DNAT compose. A client's SYN to a synproxy frontend is
not tracked (raw TCPR-NOTRACK), so it is not DNATed and reaches INPUT, where SYNPROXY answers it with a
cookie; once the client's ACK proves the cookie, the kernel sends the SYN again with ip_local_out: that one
creates the connection's conntrack entry, crosses nat OUTPUT and our TCPR-FRONTENDS hook, is DNATed to the
backend the rotation picks, and the connection then carries data both ways. A SYN flood from spoofed sources
creates no conntrack entry at all (without synproxy, the same burst creates one per forwarded SYN).
"""

from __future__ import annotations

import subprocess
from contextlib import AbstractContextManager

import pytest

from tcprouter.compiler import Options, Synproxy, compile_rules
from tcprouter.model import Backend, Balance, DesiredState, Frontend
from tcprouter.sysctls import TCP_LOOSE

from .support import greeter, greetings, in_netns, sh
from .test_kernel_perimeter import BACKEND, FLAVOURS, Lab, apply, lab

pytestmark = pytest.mark.kernel
SECOND = Backend("c" * 64, "web2", "10.70.9.2", 8081, subnet="10.70.9.0/24")  # greets "second"
BURST = 3000  # spoofed SYNs


def state() -> DesiredState:
    return DesiredState({80: Frontend(80, Balance.ROUNDROBIN, (BACKEND, SECOND))})


def ns_sh(ns: str, *args: str) -> str:
    return sh("ip", "netns", "exec", ns, *args)


def tracked(ns: str, port: int) -> int:
    """Conntrack entries of connections to `port` in namespace `ns`."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "conntrack", "-L", "-p", "tcp", "--orig-port-dst", str(port)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


def spoofed_burst(client: str, address: str) -> None:
    """BURST SYNs from random source addresses, 20,000/s (hping3 exits 1: no replies reach spoofed sources). A flood's
    rate is benchlib.flood's to measure; here it only has to be a spoofed burst that leaves no entry."""
    sh(
        "ip",
        "netns",
        "exec",
        client,
        "hping3",
        "-q",
        "-S",
        "-p",
        "80",
        "--rand-source",
        "-i",
        "u50",
        "-c",
        str(BURST),
        address,
        check=False,
    )


def second_backend(net: Lab) -> AbstractContextManager[int]:
    """A listener on 10.70.9.2:8081 in the backend namespace that greets 'second'."""
    return greeter(net.backend, "10.70.9.2", "second", 8081)


def synproxy_packets(net: Lab) -> int:
    _, counted = net.iptables.read(counters=True)
    return sum(r.packets for _, r in counted if r.chain == "TCPR-SYNPROXY" and "SYNPROXY" in r.spec)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_synproxy_composes_with_dnat_and_a_spoofed_flood_leaves_no_conntrack_entry(flavour):
    with lab(flavour) as net, second_backend(net):
        tables, _ = net.iptables.read()
        before = in_netns(net.router, lambda: TCP_LOOSE.take(tables))  # per network namespace
        assert (before, ns_sh(net.router, "sysctl", "-n", TCP_LOOSE.name).strip()) == (1, "0")
        apply(net.iptables, compile_rules(state(), Options(synproxy=Synproxy.ALL, tcp_loose_before=before)))
        assert TCP_LOOSE.recorded(net.iptables.read()[0]) == 1

        # Exact rotation through the proxied handshake, data both ways (greeting back, then a request).
        assert greetings(net.client1, "10.70.1.1", 80, 4) == ["10.70.9.2", "second"] * 2
        entries = ns_sh(net.router, "conntrack", "-L", "-p", "tcp", "--orig-port-dst", "80")
        assert "dst=10.70.1.1" in entries and "src=10.70.9.2" in entries  # tracked from the re-sent SYN on, DNATed
        assert synproxy_packets(net) >= 4  # the SYNs and ACKs went through SYNPROXY, not around it
        ns_sh(net.router, "conntrack", "-D", "-p", "tcp", "--orig-port-dst", "80")

        spoofed_burst(net.client1, "10.70.1.1")
        # They arrived, less the martian sources (0/8, 127/8, 224/4: 18 of 256, ~7%) and what a busy host's veth
        # drops (at 50,000/s, a loaded CI host answered 2,681 of 3,000): answered with cookies.
        assert synproxy_packets(net) >= BURST * 0.85
        assert tracked(net.router, 80) == 0
        assert greetings(net.client2, "10.70.2.1", 80, 2) == ["10.70.9.2", "second"]

        # Cleanup gives tcp_loose back and removes the raw chains and hooks.
        current, _ = net.iptables.read()
        assert in_netns(net.router, lambda: TCP_LOOSE.give_back(current))
        apply(net.iptables, compile_rules(DesiredState({}), Options()))
        assert ns_sh(net.router, "sysctl", "-n", TCP_LOOSE.name).strip() == "1"
        assert "TCPR-" not in net.iptables.save("raw")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_without_synproxy_the_same_burst_fills_conntrack(flavour):
    """The control: what the flood does to an unprotected frontend (one entry per spoofed SYN)."""
    with lab(flavour) as net:
        apply(net.iptables, compile_rules(state(), Options()))
        spoofed_burst(net.client1, "10.70.1.1")
        # One entry per SYN that the router forwards (about half here: the rest have sources it drops as martian
        # or cannot route back to); with synproxy, the test above finds none.
        assert tracked(net.router, 80) > BURST // 4
