"""IPv6: the rules of each family hold that family's backends only; ip6tables loads them and prints them back."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcprouter.commands import status
from tcprouter.compiler import Options, RuleSet, compile_rules
from tcprouter.diff import believed_tables, owned_only, restore_script
from tcprouter.families import FamilySyncers
from tcprouter.labels import desired_state
from tcprouter.metrics import Metrics
from tcprouter.model import OPEN, Access, Backend, Balance, DesiredState, Family, Frontend, Protocol
from tcprouter.netfilter import Flavour, Iptables, NetfilterError
from tcprouter.sync import Syncer

from .fakes import FakeKernel
from .strategies import container, desired_states
from .support import private_netns, sh

V6 = Options(family=Family.IPV6, forward_parent="FORWARD")
DUAL = Backend("1" * 64, "web.1", "172.20.0.2", 80, subnet="172.20.0.0/16", ip6="fd00:20::2", subnet6="fd00:20::/64")
V4_ONLY = Backend("2" * 64, "web.2", "172.17.0.3", 80, subnet="172.17.0.0/16")
FLAVOURS6 = [f for f in Flavour if sh("sh", "-c", f"command -v ip6tables-{f}-restore", check=False)]
FOREIGN6 = """*nat
:FOREIGN - [0:0]
-A PREROUTING -p udp -m udp --dport 53 -j FOREIGN
-A FOREIGN -d fd00:99::1/128 -j RETURN
COMMIT
*filter
-A FORWARD -s fd00:99::/64 -j ACCEPT
COMMIT
"""


def _saved(ip6tables: Iptables) -> list[str]:
    return [line for t in ("nat", "filter") for line in ip6tables.save(t).splitlines() if not line.startswith("#")]


def _state(*backends: Backend, access: Access = OPEN) -> DesiredState:
    return DesiredState({80: Frontend(80, Balance.ROUNDROBIN, backends, access)})


def test_ipv6_rules_reach_the_ipv6_addresses_of_dual_stack_backends_only():
    rules = compile_rules(_state(DUAL, V4_ONLY), V6)
    assert rules.chains["nat"]["TCPR-FE-80"] == (
        "-j CONNMARK --set-xmark 0x100000/0x100000",
        '! -s fd00:20::2/128 -p tcp -m comment --comment "web.1" -j DNAT --to-destination [fd00:20::2]:80',
    )
    assert rules.chains["nat"]["TCPR-POSTROUTING"] == (
        "-s fd00:20::/64 -d fd00:20::/64 -m connmark --mark 0x100000/0x100000 -j MASQUERADE",
    )
    assert rules.chains["filter"]["TCPR-INVALID"] == (
        "-s fd00:20::/64 -p tcp -j DROP",
        "-d fd00:20::/64 -p tcp -j DROP",
    )
    assert ("OUTPUT", "! -d ::1/128 -m addrtype --dst-type LOCAL -j TCPR-FRONTENDS") in rules.hooks["nat"]


def test_a_pool_without_ipv6_backends_has_no_ipv6_rules_but_keeps_its_ipv4_ones():
    state = _state(V4_ONLY)
    assert "TCPR-FE-80" not in compile_rules(state, V6).chains["nat"]
    assert compile_rules(state, V6).chains["nat"]["TCPR-FRONTENDS"] == ()
    ipv4 = compile_rules(state, Options(forward_parent="FORWARD")).chains["nat"]
    assert ipv4["TCPR-FE-80"][-1].endswith("--to-destination 172.17.0.3:80")


def test_route_localhost_is_ipv4_only():
    rules = compile_rules(_state(DUAL), dataclasses.replace(V6, route_localhost=True))
    assert "TCPR-INPUT" not in rules.chains["filter"]
    assert ("OUTPUT", "! -d ::1/128 -m addrtype --dst-type LOCAL -j TCPR-FRONTENDS") in rules.hooks["nat"]
    assert not any("127.0.0.0/8" in rule for rule in rules.chains["nat"]["TCPR-POSTROUTING"])


def test_allowed_networks_go_to_the_rules_of_their_family_and_connlimit_masks_a_whole_address():
    access = Access(allow=("10.0.0.0/8", "2001:db8::/32"), maxconn=3)
    v6 = compile_rules(_state(DUAL, access=access), V6).chains["filter"]
    v4 = compile_rules(_state(DUAL, access=access), Options()).chains["filter"]
    assert v6["TCPR-AL-80"][0] == "-s 2001:db8::/32 -j RETURN" and len(v6["TCPR-AL-80"]) == 2
    assert v4["TCPR-AL-80"][0] == "-s 10.0.0.0/8 -j RETURN" and len(v4["TCPR-AL-80"]) == 2
    assert "--connlimit-mask 128 " in v6["TCPR-AC-80"][1] and "--connlimit-mask 32 " in v4["TCPR-AC-80"][1]


def test_an_allow_list_without_ipv6_networks_refuses_every_ipv6_client():
    v6 = compile_rules(_state(DUAL, access=Access(allow=("10.0.0.0/8",))), V6).chains["filter"]
    assert v6["TCPR-AL-80"] == ("-p tcp -m comment --comment refused-80-allow -j REJECT --reject-with tcp-reset",)


def test_labels_give_a_backend_the_ipv6_address_and_subnet_of_its_network():
    dual = container(
        1,
        networks={"v6net": "172.20.0.2", "bridge": "172.17.0.2"},
        subnets={"v6net": "172.20.0.0/16", "bridge": "172.17.0.0/16"},
        networks6={"v6net": "fd00:20::2"},
        subnets6={"v6net": "fd00:20::/64"},
        labels={"tcp.port": "80", "tcp.network": "v6net"},
    )
    on_bridge = dataclasses.replace(dual, labels={"tcp.port": "80"})  # bridge (first by name) has no IPv6
    (backend,) = desired_state([dual]).frontends[80].backends
    assert (backend.ip6, backend.subnet6) == ("fd00:20::2", "fd00:20::/64")
    (backend,) = desired_state([on_bridge]).frontends[80].backends
    assert (backend.ip, backend.ip6) == ("172.17.0.2", "")


@given(desired_states(udp=True))
def test_the_ipv6_view_keeps_every_frontend_with_its_ipv6_backends_in_order(state):
    view = state.of_family(Family.IPV6)
    assert view.of_family(Family.IPV6) == view  # idempotent: the compiler may apply it again
    assert state.of_family(Family.IPV4) is state
    for protocol in Protocol:
        assert set(view.pools(protocol)) == set(state.pools(protocol))
        for port, frontend in state.pools(protocol).items():
            assert [b.ip for b in view.pools(protocol)[port].backends] == [b.ip6 for b in frontend.backends if b.ip6]


@pytest.mark.kernel
@pytest.mark.parametrize("flavour", FLAVOURS6)
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=desired_states(udp=True), second=desired_states(udp=True), snat=st.booleans())
def test_compiled_ipv6_rules_load_and_read_back_equal(flavour, first, second, snat):
    """ip6tables-save prints the IPv6 rules exactly as compiled; foreign ip6tables rules stay; cleanup removes
    every owned chain."""
    with private_netns() as ns:
        ip6tables = Iptables(Flavour(flavour), netns=ns, family=Family.IPV6)
        ip6tables.restore(FOREIGN6)
        foreign = _saved(ip6tables)
        for state, options in ((first, V6), (second, dataclasses.replace(V6, snat_always=snat, route_localhost=True))):
            rules = compile_rules(state, options)
            current, _ = ip6tables.read()
            ip6tables.restore(restore_script(current, rules))
            tables, _ = ip6tables.read()
            assert owned_only(tables) == believed_tables(rules)
            assert restore_script(tables, rules) == ""  # in step: nothing left to write
        ip6tables.restore(restore_script(ip6tables.read()[0], RuleSet(chains={})))
        assert _saved(ip6tables) == foreign


def _dual(i: int, **fields: object):
    """Container c<i> on a network created with --ipv6: 10.9.0.<i+1> and fd00:9::<i+1> (hex)."""
    return container(i, networks6={"bridge": f"fd00:9::{i + 1}"}, subnets6={"bridge": "fd00:9::/64"}, **fields)


class BrokenKernel(FakeKernel):
    def restore(self, script: str) -> None:
        raise NetfilterError("ip6tables-nft-restore: no IPv6 NAT here")


def _pair(kernel6: FakeKernel) -> tuple[FamilySyncers, FakeKernel, Metrics]:
    kernel4, metrics = FakeKernel(), Metrics(lambda: ({}, []))
    syncers = FamilySyncers(
        {f: Syncer(k, Options(), "tcp", metrics) for f, k in ((Family.IPV6, kernel6), (Family.IPV4, kernel4))}
    )
    syncers.options = Options(mark_bit=0x4000)  # the owner's options: each syncer keeps its family
    return syncers, kernel4, metrics


def test_each_family_writes_its_own_tables_from_the_same_view_and_metrics_count_backends_per_family():
    syncers, kernel4, metrics = _pair(kernel6 := FakeKernel())
    view = [_dual(1), container(2)]  # c2: IPv4 only
    assert list(syncers.syncers) == [Family.IPV4, Family.IPV6]
    assert syncers.sync(view, full=True)
    assert kernel4.tables["nat"]["TCPR-FE-80"][-1].endswith("--to-destination 10.9.0.2:80")  # the fallback
    v6 = kernel6.tables["nat"]["TCPR-FE-80"]
    assert v6[0] == "-j CONNMARK --set-xmark 0x4000/0x4000" and v6[1].endswith("--to-destination [fd00:9::2]:80")
    assert len(v6) == 2 and not any("10.9.0" in rule for rule in v6)
    backends = {
        (labels["family"], labels["frontend"]): value
        for labels, value in (
            (s.labels, s.value) for s in metrics.registry.collect() for s in s.samples if s.name == "tcprouter_backends"
        )
    }
    assert backends == {("ipv4", "80"): 2, ("ipv6", "80"): 1}
    assert not syncers.drifted()
    kernel6.tables["nat"]["TCPR-FRONTENDS"].clear()  # someone flushed an IPv6 chain
    assert syncers.drifted()


def test_a_failed_ipv6_write_fails_the_sync_but_the_ipv4_rules_are_written():
    syncers, kernel4, _ = _pair(BrokenKernel())
    assert not syncers.sync([_dual(1)], full=True)
    assert "TCPR-FE-80" in kernel4.tables["nat"]


def test_status_lists_a_dual_stack_backend_once_per_family_with_its_own_kernel_rules():
    view = [_dual(1), container(2)]
    syncers, kernel4, _ = _pair(kernel6 := FakeKernel())
    assert syncers.sync(view, full=True)
    report = status.status_report(view, kernel4.read()[1], "tcp", kernel6=kernel6.read()[1])
    rows = [(b["container"], b["family"], b["address"], b["in_kernel"]) for b in report["frontends"][0]["backends"]]
    assert rows == [
        ("c1", "ipv4", "10.9.0.2:80", True),
        ("c1", "ipv6", "[fd00:9::2]:80", True),
        ("c2", "ipv4", "10.9.0.3:80", True),
    ]
    (v6_row,) = [line for line in status.render_status(report).splitlines() if "ipv6" in line]
    assert v6_row.split()[:4] == ["c1", "-", "ipv6", "[fd00:9::2]:80"]


def test_a_partial_sync_with_the_tracker_s_changes_reaches_every_family():
    """The runner passes the changed containers (ChangeTracker.take_changes) as its fifth argument."""
    syncers, kernel4, _ = _pair(kernel6 := FakeKernel())
    first = _dual(1)
    assert syncers.sync([first], (), True, {}, None)
    joined = _dual(2)
    assert syncers.sync([first, joined], (), False, {}, {joined.id: joined})
    assert any(rule.endswith("10.9.0.3:80") for rule in kernel4.tables["nat"]["TCPR-FE-80"])
    assert any(rule.endswith("[fd00:9::3]:80") for rule in kernel6.tables["nat"]["TCPR-FE-80"])
