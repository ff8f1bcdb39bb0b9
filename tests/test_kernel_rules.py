"""Rule programming against the real kernel, in private network namespaces (their own, empty tables)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcprouter.compiler import Options, RuleSet, compile_rules
from tcprouter.diff import believed_tables, owned_only, parse_save, restore_script
from tcprouter.model import Backend, Balance, DesiredState, Frontend
from tcprouter.netfilter import Flavour, Iptables

from .strategies import desired_states
from .support import private_netns, sh

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
