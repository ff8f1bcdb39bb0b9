"""The perimeter in the real kernel, in private network namespaces: where the filter hook sits in DOCKER-USER
(operators' rules win), which INVALID packets it drops, and the access labels, with real connections.

The lab: a router namespace (the host: DOCKER-USER hooked from FORWARD, FORWARD's policy DROP as Docker sets
it) between two clients on their own subnets and a backend namespace listening on 10.70.9.2:8080. Frontend 80
is routed to it by the compiled rules, as tcprouter writes them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest

from tcprouter.compiler import Options, RuleSet, compile_rules
from tcprouter.diff import hook_in_place, parse_save, restore_script
from tcprouter.model import OPEN, Access, Backend, Balance, DesiredState, Frontend
from tcprouter.netfilter import Flavour, Iptables

from .support import connect_outcome, greeter, in_netns, invalid_segment_crosses, private_netns, sh, unique, wait_until

pytestmark = pytest.mark.kernel
FLAVOURS = [f for f in Flavour if sh("sh", "-c", f"command -v iptables-{f}-restore", check=False)]
HOOK = "-j TCPR-FORWARD"
BACKEND = Backend("b" * 64, "web", "10.70.9.2", 8080, subnet="10.70.9.0/24")
OPTIONS = Options(forward_parent="DOCKER-USER")
# What Docker (20.10) leaves in the filter table, plus the host's own policy for traffic between the clients:
# only INVALID packets pass it, so that one arriving proves it was INVALID and tcprouter let it through.
DOCKER = """*filter
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -s 10.70.1.0/24 -d 10.70.2.0/24 -m conntrack --ctstate INVALID -j ACCEPT
-A DOCKER-USER -j RETURN
COMMIT
"""


def rules(access: Access = OPEN) -> RuleSet:
    return compile_rules(DesiredState({80: Frontend(80, Balance.ROUNDROBIN, (BACKEND,), access)}), OPTIONS)


def apply(iptables: Iptables, wanted: RuleSet) -> str:
    """One full sync: the script from what the kernel holds; returns it."""
    script = restore_script(iptables.read()[0], wanted)
    if script:
        iptables.restore(script)
    return script


def docker_user(iptables: Iptables) -> tuple[str, ...]:
    return parse_save(iptables.save("filter"))[0]["filter"]["DOCKER-USER"]


# ---- placement (rules only) -------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_the_hook_goes_after_the_operators_rules_and_stays_there(flavour):
    with private_netns() as ns:
        iptables = Iptables(Flavour(flavour), netns=ns)
        iptables.restore(
            DOCKER.replace(
                "-A DOCKER-USER -j RETURN", "-A DOCKER-USER -s 192.0.2.0/24 -j DROP\n-A DOCKER-USER -j RETURN"
            )
        )
        apply(iptables, rules())
        assert docker_user(iptables) == ("-s 192.0.2.0/24 -j DROP", HOOK, "-j RETURN")

        # The operator inserts a rule later (-I, the usual way): it is above ours, a resync moves nothing.
        iptables.restore("*filter\n-I DOCKER-USER 1 -s 198.51.100.0/24 -j DROP\nCOMMIT\n")
        assert apply(iptables, rules()) == ""
        # One appended after Docker's RETURN never runs, wherever our hook is: nothing moves either.
        iptables.restore("*filter\n-A DOCKER-USER -s 203.0.113.0/24 -j DROP\nCOMMIT\n")
        assert apply(iptables, rules()) == ""
        assert docker_user(iptables) == (
            "-s 198.51.100.0/24 -j DROP",
            "-s 192.0.2.0/24 -j DROP",
            HOOK,
            "-j RETURN",
            "-s 203.0.113.0/24 -j DROP",
        )

        # Our hook moved after the RETURN (never reached): it goes back before it; the operator's rules stay.
        iptables.restore(f"*filter\n-D DOCKER-USER {HOOK}\n-A DOCKER-USER {HOOK}\nCOMMIT\n")
        assert "DOCKER-USER" in apply(iptables, rules())
        assert docker_user(iptables) == (
            "-s 198.51.100.0/24 -j DROP",
            "-s 192.0.2.0/24 -j DROP",
            HOOK,
            "-j RETURN",
            "-s 203.0.113.0/24 -j DROP",
        )


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_without_dockers_return_the_hook_follows_a_rule_appended_below_it(flavour):
    """Docker 28 leaves DOCKER-USER empty: an operator's `-A` lands below our hook, where it would not see
    routed flows; the resync puts the hook after it."""
    with private_netns() as ns:
        iptables = Iptables(Flavour(flavour), netns=ns)
        iptables.restore(DOCKER.replace("-A DOCKER-USER -j RETURN\n", ""))
        apply(iptables, rules())
        assert docker_user(iptables) == (HOOK,)
        iptables.restore("*filter\n-A DOCKER-USER -s 192.0.2.0/24 -j DROP\nCOMMIT\n")
        assert not hook_in_place("DOCKER-USER", docker_user(iptables), HOOK)
        apply(iptables, rules())
        assert docker_user(iptables) == ("-s 192.0.2.0/24 -j DROP", HOOK)


# ---- traffic ------------------------------------------------------------------------------------------------


@dataclass
class Lab:
    router: str
    client1: str  # 10.70.1.2, reaches the frontend at 10.70.1.1:80
    client2: str  # 10.70.2.2, at 10.70.2.1:80
    backend: str
    iptables: Iptables

    def outcome(self, client: int) -> str:
        ns = (self.client1, self.client2)[client - 1]
        return connect_outcome(ns, f"10.70.{client}.1", 80, timeout=1.0)


@contextmanager
def lab(flavour: str) -> Iterator[Lab]:
    with ExitStack() as stack:
        router, client1, client2, backend = (stack.enter_context(private_netns()) for _ in range(4))
        for ns, net in ((client1, "10.70.1"), (client2, "10.70.2"), (backend, "10.70.9")):
            inside, outside = unique("tcpr"), unique("tcpr")
            sh("ip", "link", "add", outside, "netns", router, "type", "veth", "peer", "name", inside, "netns", ns)
            for where, dev, address in ((router, outside, f"{net}.1/24"), (ns, inside, f"{net}.2/24")):
                sh("ip", "-n", where, "addr", "add", address, "dev", dev)
                sh("ip", "-n", where, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"{net}.1")
        sh("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        iptables = Iptables(Flavour(flavour), netns=router)
        iptables.restore(DOCKER)
        # the backend keeps every connection open until the end
        stack.enter_context(greeter(backend, "10.70.9.2", "10.70.9.2", 8080, hold=True))
        yield Lab(router, client1, client2, backend, iptables)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_operators_drop_added_after_start_stops_that_client_and_no_other(flavour):
    with lab(flavour) as net:
        apply(net.iptables, rules())
        assert (net.outcome(1), net.outcome(2)) == ("answered", "answered")
        net.iptables.restore("*filter\n-I DOCKER-USER 1 -s 10.70.1.0/24 -j DROP\nCOMMIT\n")
        assert apply(net.iptables, rules()) == ""  # the resync leaves the operator's rule on top
        assert (net.outcome(1), net.outcome(2)) == ("timeout", "answered")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_invalid_packet_of_the_hosts_other_traffic_is_not_dropped(flavour):
    """A SYN+RST segment from one client to the other is INVALID for conntrack; the host lets such packets
    between them pass (its own rule after DOCKER-USER). tcprouter's rules must not drop it."""
    with lab(flavour) as net:
        apply(net.iptables, rules())
        assert invalid_segment_crosses(net.client1, "10.70.1.2", net.client2, "10.70.2.2")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_allow_lets_exactly_the_listed_clients_in_and_counts_the_others(flavour):
    with lab(flavour) as net:
        apply(net.iptables, rules(Access(allow=("10.70.1.0/24",))))
        assert (net.outcome(1), net.outcome(2)) == ("answered", "refused")  # a reset at once, not a timeout
        _, counted = net.iptables.read(counters=True)
        refused = [r.packets for table, r in counted if r.chain == "TCPR-AL-80" and "REJECT" in r.spec]
        assert refused == [1]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_maxconn_refuses_the_third_concurrent_connection_with_a_reset(flavour):
    with lab(flavour) as net:
        apply(net.iptables, rules(Access(maxconn=2)))

        def open_connections() -> list[socket.socket]:
            return [socket.create_connection(("10.70.1.1", 80), timeout=1) for _ in range(2)]

        held = in_netns(net.client1, open_connections)
        try:
            assert net.outcome(1) == "refused"
            assert net.outcome(2) == "answered"  # per client address
        finally:
            for conn in held:
                conn.close()
        wait_until(lambda: net.outcome(1) == "answered", timeout=10, what="a slot to free up")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rate_refuses_above_the_rate_and_recovers(flavour):
    with lab(flavour) as net:
        apply(net.iptables, rules(Access(rate=1, burst=2)))
        outcomes = [net.outcome(1) for _ in range(5)]  # far faster than 1/s
        assert outcomes[:2] == ["answered", "answered"] and "refused" in outcomes[2:]
        assert net.outcome(2) == "answered"  # per client address
        wait_until(lambda: net.outcome(1) == "answered", timeout=5, what="the rate to allow a connection again")
