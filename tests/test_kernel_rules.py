"""Rule programming against the real kernel, in private network namespaces (their own, empty tables)."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcprouter.compiler import Options, RuleSet, bucket_chain, compile_rules, frontend_chain, is_bucket_chain
from tcprouter.diff import believed_tables, owned_only, parse_save, restore_script
from tcprouter.model import Backend, Balance, DesiredState, Frontend
from tcprouter.netfilter import Flavour, Iptables

from .strategies import desired_states
from .support import in_netns, private_netns, sh, unique

pytestmark = pytest.mark.kernel
FOREIGN = """*nat
:FOREIGN - [0:0]
-A PREROUTING -p udp -m udp --dport 53 -j FOREIGN
-A FOREIGN -j RETURN
COMMIT
*filter
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""
FLAVOURS = [f for f in Flavour if sh("sh", "-c", f"command -v iptables-{f}-restore", check=False)]


def kernel_view(iptables: Iptables) -> dict:
    tables, _ = iptables.read()
    return owned_only(tables)


def apply(iptables: Iptables, rules: RuleSet) -> str:
    current, _ = iptables.read()
    script = restore_script(current, rules)
    iptables.restore(script)
    return script


@pytest.mark.parametrize("flavour", FLAVOURS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=desired_states(), second=desired_states(), localhost=st.booleans(), snat=st.booleans())
def test_compiled_rules_load_and_the_kernel_holds_exactly_them(flavour, first, second, localhost, snat):
    options = Options(forward_parent="DOCKER-USER")
    with private_netns() as ns:
        iptables = Iptables(Flavour(flavour), netns=ns)
        iptables.restore(FOREIGN)
        foreign_before = [line for line in iptables.save("nat").splitlines() if not line.startswith("#")]

        rules = compile_rules(first, options)
        iptables.restore(restore_script({}, rules), test=True)
        apply(iptables, rules)
        assert kernel_view(iptables) == believed_tables(rules)

        updated = compile_rules(second, dataclasses.replace(options, route_localhost=localhost, snat_always=snat))
        apply(iptables, updated)
        assert kernel_view(iptables) == believed_tables(updated)
        assert apply(iptables, updated) == ""  # in step: nothing left to write

        apply(iptables, RuleSet(chains={}))  # cleanup
        after = [line for line in iptables.save("nat").splitlines() if not line.startswith("#")]
        assert after == foreign_before
        assert not any("TCPR-" in line for t in ("nat", "filter") for line in iptables.save(t).splitlines())


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_hooks_are_moved_back_on_top_and_duplicates_removed(flavour):
    with private_netns() as ns:
        iptables = Iptables(Flavour(flavour), netns=ns)
        iptables.restore(FOREIGN)
        pool = (Backend("1" * 64, "web.1", "172.17.0.2", 80), Backend("2" * 64, "web.2", "172.17.0.3", 80))
        rules = compile_rules(DesiredState({80: Frontend(80, Balance.ROUNDROBIN, pool)}), Options())
        apply(iptables, rules)
        # Someone inserts a rule above our hook and adds a second copy of it.
        iptables.restore(
            "*nat\n-I PREROUTING 1 -p tcp -m tcp --dport 22 -j RETURN\n"
            "-A PREROUTING -m addrtype --dst-type LOCAL -j TCPR-FRONTENDS\nCOMMIT\n"
        )
        apply(iptables, rules)
        prerouting = parse_save(iptables.save("nat"))[0]["nat"]["PREROUTING"]
        assert prerouting == (
            "-m addrtype --dst-type LOCAL -j TCPR-FRONTENDS",
            "-p tcp -m tcp --dport 22 -j RETURN",
            "-p udp -m udp --dport 53 -j FOREIGN",
        )


def _answers(ns: str, address: str, port: int) -> bool:
    """Whether a TCP connect from namespace `ns` completes (a silent drop times out)."""

    def attempt() -> bool:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return True
        except TimeoutError:
            return False

    return in_netns(ns, attempt)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_route_localhost_drops_packets_to_loopback_from_another_interface(flavour):
    """CVE-2020-8558: with route_localnet=1 a neighbour can reach the router's 127.0.0.1 services by sending
    to 127.0.0.1 through a real interface. A neighbour namespace does exactly that (its 127.0.0.1 routed out
    of its veth): it gets an answer until the --route-localhost rules are loaded, then its SYN is dropped by
    TCPR-INPUT, whose counter shows it."""
    with private_netns() as router, private_netns() as neighbour:
        here, there = unique("tcpr"), unique("tcpr")
        sh("ip", "link", "add", here, "netns", router, "type", "veth", "peer", "name", there, "netns", neighbour)
        for ns, dev, address in ((router, here, "10.99.0.1/24"), (neighbour, there, "10.99.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", address, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
        # The neighbour's 127.0.0.1 is the router: a rule ahead of the local table sends it out of the veth.
        sh(
            "ip",
            "-n",
            neighbour,
            "route",
            "add",
            "127.0.0.1/32",
            "via",
            "10.99.0.1",
            "src",
            "10.99.0.2",
            "table",
            "100",
        )
        sh("ip", "-n", neighbour, "rule", "add", "pref", "10", "to", "127.0.0.1", "lookup", "100")
        sh("ip", "-n", neighbour, "rule", "del", "pref", "0")
        sh("ip", "-n", neighbour, "rule", "add", "pref", "100", "lookup", "local")
        listener = in_netns(router, lambda: socket.create_server(("127.0.0.1", 0)))
        with listener:
            port = listener.getsockname()[1]
            assert _answers(neighbour, "127.0.0.1", port)  # the hole the rules must close

            iptables = Iptables(Flavour(flavour), netns=router)
            apply(iptables, compile_rules(DesiredState({}), Options(forward_parent="FORWARD", route_localhost=True)))
            assert not _answers(neighbour, "127.0.0.1", port)
            assert _answers(router, "127.0.0.1", port)  # loopback itself still works
        _, counted = iptables.read(counters=True)
        drops = [rule.packets for table, rule in counted if rule.chain == "TCPR-INPUT" and rule.spec.endswith("DROP")]
        assert drops and drops[0] >= 1


@pytest.mark.parametrize("flavour", FLAVOURS)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=desired_states(udp=True), second=desired_states(udp=True))
def test_compiled_udp_rules_load_and_read_back_equal(flavour, first, second):
    """TCP and UDP frontends (on shared port numbers too): iptables-save prints the UDP rules exactly as compiled."""
    with private_netns() as ns:
        iptables = Iptables(Flavour(flavour), netns=ns)
        for state in (first, second):
            rules = compile_rules(state, Options(forward_parent="FORWARD"))
            apply(iptables, rules)
            assert kernel_view(iptables) == believed_tables(rules)
            assert apply(iptables, rules) == ""


OPTIONS = Options(forward_parent="FORWARD")  # a private namespace has no DOCKER-USER


def tree_state(ports: Sequence[int], address: str, port: int) -> DesiredState:
    """One frontend per port, each with one backend: a listener at `address`:`port`."""
    backend = Backend("1" * 64, "listener", address, port)
    return DesiredState({p: Frontend(p, Balance.ROUNDROBIN, (backend,)) for p in ports})


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_dispatch_tree_loads_reads_back_and_routes_a_connection_to_the_300th_frontend(flavour):
    """300 frontends over 9 buckets of ports: the tree loads and reads back as compiled in both flavours (port
    ranges included), a client in another namespace reaches the first and the 300th frontend (DNATed to a
    listener; nothing listens on the frontend ports), a port between frontends is not routed, and a frontend
    joining a bucket is written as the syncer writes it (its chain and its bucket's)."""
    ports = [20000 + 7 * i for i in range(300)]
    with private_netns() as router, private_netns() as client:
        here, there = unique("tcpr"), unique("tcpr")
        sh("ip", "link", "add", here, "netns", router, "type", "veth", "peer", "name", there, "netns", client)
        for ns, dev, address in ((router, here, "10.99.0.1/24"), (client, there, "10.99.0.2/24")):
            sh("ip", "-n", ns, "addr", "add", address, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        listener = in_netns(router, lambda: socket.create_server(("10.99.0.1", 0)))
        with listener:
            iptables = Iptables(Flavour(flavour), netns=router)
            rules = compile_rules(tree_state(ports, "10.99.0.1", listener.getsockname()[1]), OPTIONS)
            assert len([chain for chain in rules.chains["nat"] if is_bucket_chain(chain)]) == 9
            apply(iptables, rules)
            assert kernel_view(iptables) == believed_tables(rules)
            assert _answers(client, "10.99.0.1", ports[-1]) and _answers(client, "10.99.0.1", ports[0])
            with pytest.raises(ConnectionRefusedError):  # no frontend: the router's own reset
                _answers(client, "10.99.0.1", ports[-1] + 1)

            grown = compile_rules(tree_state([*ports, ports[-1] + 1], "10.99.0.1", listener.getsockname()[1]), OPTIONS)
            script = apply(iptables, grown)
            assert sorted(line for line in script.splitlines() if line.startswith(":")) == [
                f":{bucket_chain(ports[-1])} - [0:0]",
                f":{frontend_chain(ports[-1] + 1)} - [0:0]",
            ]
            assert kernel_view(iptables) == believed_tables(grown)
            assert _answers(client, "10.99.0.1", ports[-1] + 1)
