"""The reconciler's logic on an in-memory kernel (tests/fakes.py), without root: partial and full syncs, drift
repairs and what they count, the periodic full resync, and that nothing it does not own is touched."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcprouter import sync
from tcprouter.compiler import Options, compile_rules
from tcprouter.diff import believed_tables, owned_only
from tcprouter.labels import desired_state
from tcprouter.metrics import Metrics
from tcprouter.model import ContainerSnapshot, timestamp_ns
from tcprouter.netfilter import NetfilterError
from tcprouter.policy import Policy, parse_ports
from tcprouter.runner import SyncRunner, Timing
from tcprouter.sync import Syncer
from tcprouter.tracker import Change, ChangeTracker, Relist

from .fakes import FakeClock, FakeKernel
from .strategies import container

# Foreign chains and rules as Docker leaves them on an nft host.
DOCKER = """*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""


def owned(kernel: FakeKernel) -> dict:
    return owned_only(kernel.read()[0])


def expected(containers: list[ContainerSnapshot]) -> dict:
    return believed_tables(compile_rules(desired_state(containers), Options(forward_parent="DOCKER-USER")))


def drift_repairs(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("tcprouter_drift_repairs_total") or 0.0


def full_syncs(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("tcprouter_sync_duration_seconds_count", {"kind": "full"}) or 0.0


@pytest.fixture
def kernel() -> FakeKernel:
    return FakeKernel(DOCKER)


@pytest.fixture
def syncer(kernel: FakeKernel) -> Syncer:
    return Syncer(kernel, Options(), "tcp", Metrics(lambda: ({}, [])))


def test_the_fake_kernel_refuses_what_iptables_restore_refuses(kernel: FakeKernel):
    before = owned(kernel), kernel.foreign()
    with pytest.raises(NetfilterError):
        kernel.restore("*nat\n:TCPR-X - [0:0]\n-D PREROUTING -j TCPR-NOWHERE\nCOMMIT\n")
    with pytest.raises(NetfilterError):
        kernel.restore("*filter\n-A TCPR-MISSING -j ACCEPT\nCOMMIT\n")
    assert (owned(kernel), kernel.foreign()) == before  # a table is committed whole or not at all


def test_a_full_sync_writes_everything_and_touches_nothing_foreign(kernel: FakeKernel, syncer: Syncer):
    foreign = kernel.foreign()
    assert syncer.sync([container(1), container(2)], full=True)
    assert owned(kernel) == expected([container(1), container(2)])
    assert kernel.foreign() == foreign
    assert syncer.sync([], full=True)  # every backend gone: the frontend goes, the foreign rules stay
    assert kernel.foreign() == foreign


def test_a_partial_sync_writes_only_what_changed_from_its_belief(kernel: FakeKernel, syncer: Syncer):
    assert syncer.sync([container(1)], full=True)
    reads, writes = kernel.reads, len(kernel.scripts)
    assert syncer.sync([container(1)])  # nothing changed: no read, no write
    assert (kernel.reads, len(kernel.scripts)) == (reads, writes)
    assert syncer.sync([container(1), container(2)])
    assert kernel.reads == reads  # partial: diffed against the last write, not the kernel
    declared = [line for line in kernel.scripts[-1].splitlines() if line.startswith(":")]
    assert declared == [":TCPR-FE-80 - [0:0]"]  # only the frontend whose pool changed is rewritten
    assert owned(kernel) == expected([container(1), container(2)])


def test_a_partial_sync_does_not_see_drift_and_a_full_one_repairs_and_counts_it(kernel: FakeKernel, syncer: Syncer):
    view = [container(1), container(2)]
    assert syncer.sync(view, full=True)
    assert drift_repairs(syncer.metrics) == 0  # the first write repairs nothing: there was no belief to differ from
    kernel.delete_rule("nat", "TCPR-FE-80", 1)  # a backend's slot, inside a frontend chain
    assert not syncer.drifted()  # the cheap check looks at hooks and top-level chains only
    assert syncer.sync(view)
    assert owned(kernel) != expected(view)
    assert syncer.sync(view, full=True)
    assert owned(kernel) == expected(view) and drift_repairs(syncer.metrics) == 1
    assert syncer.sync(view, full=True)  # nothing drifted since: nothing counted
    assert drift_repairs(syncer.metrics) == 1


@pytest.mark.parametrize(
    "tamper",
    [
        lambda k: k.flush("nat", "TCPR-FRONTENDS"),
        lambda k: k.delete_rule("nat", "PREROUTING", 0),  # our hook
        lambda k: k.insert_rule("nat", "PREROUTING", "-j ACCEPT"),  # something put ahead of our hook
        lambda k: k.flush("filter", "TCPR-FORWARD"),
    ],
    ids=["flushed-dispatch", "hook-deleted", "hook-displaced", "flushed-forward"],
)
def test_each_drift_is_found_by_the_check_repaired_and_counted_once(kernel: FakeKernel, syncer: Syncer, tamper):
    view = [container(1)]
    assert syncer.sync(view, full=True)
    assert not syncer.drifted()
    tamper(kernel)
    assert syncer.drifted()
    assert drift_repairs(syncer.metrics) == 0  # found, not yet repaired
    assert syncer.sync(view, full=True)
    assert owned(kernel) == expected(view) and not syncer.drifted()
    assert drift_repairs(syncer.metrics) == 1


def make_runner(kernel: FakeKernel, clock: FakeClock, resync: float = 60) -> SyncRunner:
    metrics = Metrics(lambda: ({}, []))
    # No waiting: the batch window is 0 and a drift check is due at every turn the tests make (one per second).
    timing = Timing(resync_interval=resync, check_interval=1, settle=0, max_delay=0)
    return SyncRunner(ChangeTracker("tcp"), Syncer(kernel, Options(), "tcp", metrics), metrics, timing, clock)


def test_the_loop_repairs_each_drift_and_counts_exactly_the_repairs(kernel: FakeKernel):
    clock = FakeClock()
    runner = make_runner(kernel, clock)
    runner.submit(Relist((container(1), container(2))))
    need_full = runner._step(True)
    tampering = [
        lambda: kernel.flush("nat", "TCPR-FRONTENDS"),
        lambda: kernel.delete_rule("nat", "PREROUTING", 0),
        lambda: kernel.flush("filter", "TCPR-FORWARD"),
    ]
    for done, tamper in enumerate(tampering, 1):
        clock.now += 1
        tamper()
        need_full = runner._step(need_full)  # the check finds it...
        if need_full:
            clock.now += 1
            need_full = runner._step(need_full)  # ...and the next turn repairs it, if this one did not
        assert owned(kernel) == expected([container(1), container(2)])
        assert drift_repairs(runner.metrics) == done
    for _ in range(5):  # quiet turns: nothing to repair, nothing counted
        clock.now += 1
        need_full = runner._step(need_full)
    assert drift_repairs(runner.metrics) == len(tampering)


def test_a_full_resync_runs_at_the_interval_and_not_before(kernel: FakeKernel):
    """An edit inside a frontend chain escapes the cheap check: only the periodic full resync repairs it."""
    clock = FakeClock()
    runner = make_runner(kernel, clock, resync=60)
    runner.submit(Relist((container(1), container(2))))
    need_full = runner._step(True)
    assert full_syncs(runner.metrics) == 1 and not need_full
    kernel.delete_rule("nat", "TCPR-FE-80", 1)
    reads = kernel.reads
    other = container(3, labels={"tcp.port": "81"})  # another frontend: its write leaves TCPR-FE-80 alone
    for second in range(1, 60):
        clock.now = 100 + second
        if second == 30:  # an event in between: a partial sync, which does not reset the resync timer
            runner.submit(Change(other.id, "start", 0, snapshot=other))
        need_full = runner._step(need_full)
        assert full_syncs(runner.metrics) == 1, f"a full resync {second} s after the last one"
    assert kernel.reads == reads  # no full read of the kernel before the interval
    assert "TCPR-FE-81" in owned(kernel)["nat"]
    assert owned(kernel) != expected([container(1), container(2), other])
    clock.now = 160
    runner._step(need_full)
    assert full_syncs(runner.metrics) == 2
    assert owned(kernel) == expected([container(1), container(2), other])
    assert drift_repairs(runner.metrics) == 1
    assert runner.schedule.next_resync == 220


def test_a_port_docker_publishes_is_found_in_its_nat_chain_and_not_routed(kernel: FakeKernel, syncer: Syncer):
    """`docker run -p 18080:80` leaves only a DNAT rule in Docker's chain (no listener without the userland proxy):
    the sync reads it, and a container claiming that port stays out of the kernel."""
    kernel.insert_rule(
        "nat", "DOCKER", "! -i docker0 -p tcp -m tcp --dport 18080 -j DNAT --to-destination 172.17.0.9:80"
    )
    squatter = container(1, labels={"tcp.port": "18080"})
    assert syncer.sync([squatter, container(2)], full=True)
    assert [(r.name, r.reason) for r in syncer.state.rejections] == [("c1", "port_in_use")]
    assert owned(kernel) == expected([container(2)])


def test_operators_rules_in_docker_user_keep_precedence_over_the_hook(kernel: FakeKernel, syncer: Syncer):
    """An operator's rule inserted on top of DOCKER-USER stays above the hook: no drift, nothing moves. One put
    between the hook and Docker's RETURN would not see routed flows: the hook is re-placed after it."""
    view = [container(1)]
    assert syncer.sync(view, full=True)
    assert kernel.tables["filter"]["DOCKER-USER"] == ["-j TCPR-FORWARD", "-j RETURN"]
    kernel.insert_rule("filter", "DOCKER-USER", "-s 192.0.2.0/24 -j DROP")
    assert not syncer.drifted()
    writes = len(kernel.scripts)
    assert syncer.sync(view, full=True)
    assert len(kernel.scripts) == writes  # nothing to write: the operator's rule is where it belongs
    kernel.insert_rule("filter", "DOCKER-USER", "-s 198.51.100.0/24 -j DROP", index=2)  # below the hook
    assert syncer.drifted()
    assert syncer.sync(view, full=True)
    assert kernel.tables["filter"]["DOCKER-USER"] == [
        "-s 192.0.2.0/24 -j DROP",
        "-s 198.51.100.0/24 -j DROP",
        "-j TCPR-FORWARD",
        "-j RETURN",
    ]


def test_synproxy_sets_tcp_loose_while_a_frontend_has_it_and_gives_it_back_after(syncer, kernel, tmp_path, monkeypatch):
    """On a file standing in for /proc/sys: 0 with the frontend, the recorded 1 again once it is gone."""
    loose = dataclasses.replace(sync.TCP_LOOSE, root=tmp_path)
    loose.path.parent.mkdir(parents=True)
    loose.path.write_text("1\n")
    monkeypatch.setattr(sync, "TCP_LOOSE", loose)
    guarded = [container(1, labels={"tcp.port": "80", "tcp.synproxy": "true"})]
    assert syncer.sync(guarded, full=True)
    assert loose.path.read_text() == "0" and "raw" in owned(kernel)
    assert syncer.sync([])
    assert loose.path.read_text() == "1" and "raw" not in owned(kernel)


def test_synproxy_is_off_when_tcp_loose_cannot_be_set(syncer, kernel, tmp_path, monkeypatch):
    """Without tcp_loose=0, SYNPROXY would break every handshake: the frontend is routed without it."""
    monkeypatch.setattr(sync, "TCP_LOOSE", dataclasses.replace(sync.TCP_LOOSE, root=tmp_path / "missing"))
    assert syncer.sync([container(1, labels={"tcp.port": "80", "tcp.synproxy": "true"})], full=True)
    assert "raw" not in owned(kernel) and "TCPR-FE-80" in owned(kernel)["nat"]


def test_a_partial_sync_rewrites_only_the_frontend_that_changed(kernel, syncer):
    view = [container(i, labels={"tcp.port": str(80 + i % 3)}) for i in range(9)]
    assert syncer.sync(view, full=True)
    reads = kernel.reads
    assert syncer.sync(view[1:])  # c0 (frontend 80) leaves
    script = kernel.scripts[-1]
    assert [line for line in script.splitlines() if line.startswith(":")] == [":TCPR-FE-80 - [0:0]"]
    assert kernel.reads == reads  # against what was written, not read
    assert owned(kernel) == expected(view[1:])
    moved = container(4, labels={"tcp.port": "90"}, networks={"other": "10.8.0.5"}, subnets={"other": "10.8.0.0/24"})
    changed = [*view[1:4], moved, *view[5:]]  # a new frontend on a new network: the shared chains change too
    assert syncer.sync(changed)
    assert owned(kernel) == expected(changed)


def frontends(count: int, first_port: int = 1000) -> dict[int, ContainerSnapshot]:
    """`count` containers, each the one backend of its own frontend on first_port, first_port + 1, ..."""
    return {
        i: container(
            i,
            labels={"tcp.port": str(first_port + i)},
            created=timestamp_ns(f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}Z"),
        )
        for i in range(count)
    }


@pytest.mark.parametrize(
    ("base", "ports"),
    [(3, ["80", "81", "82"]), (66, ["1000", "1020", "1030", "1300"])],
    ids=["flat", "tree"],  # 66 frontends: a tree of buckets, flat again when 2 of them leave
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_partial_syncs_keep_the_kernel_equal_to_the_compiled_view(kernel, base, ports, data, tmp_path, monkeypatch):
    """Whatever joins, leaves or changes its labels (access, synproxy: the SYN proxy's chains are the union of the
    frontends that have it, kept per changed frontend), the kernel holds what a compile of the whole view gives."""
    loose = dataclasses.replace(sync.TCP_LOOSE, root=tmp_path)  # a file standing in for /proc/sys
    loose.path.parent.mkdir(parents=True, exist_ok=True)
    loose.path.write_text("1\n")
    monkeypatch.setattr(sync, "TCP_LOOSE", loose)
    steps = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, 5),
                st.sampled_from([*ports, None]),
                st.booleans(),
                st.booleans(),
                st.sampled_from([("tcp",), ("udp",), ("tcp", "udp")]),
            ),
            max_size=12,
        )
    )
    syncer = Syncer(kernel, Options(), "tcp", Metrics(lambda: ({}, [])))
    view = {i: container(i) for i in range(3)} if base == 3 else frontends(base)
    assert syncer.sync(list(view.values()), full=True)
    for index, port, limited, proxied, protocols in steps:
        if port is None:
            view.pop(index, None)
        else:
            labels = (
                {f"{p}.port": port for p in protocols}
                | ({"tcp.maxconn": "5"} if limited else {})
                | ({"tcp.synproxy": "true"} if proxied else {})
            )
            subnet = f"10.{index % 2}.0"
            view[index] = dataclasses.replace(
                view.get(index, container(index)),
                labels=labels,
                networks={"n": f"{subnet}.{index + 2}"},
                subnets={"n": f"{subnet}.0/24"},
            )
        assert syncer.sync(list(view.values()))
        assert owned(kernel) == expected(list(view.values()))
        assert loose.path.read_text().strip() == ("0" if "raw" in owned(kernel) else "1")


def test_in_a_tree_a_frontend_joining_rewrites_its_bucket_and_its_chain_without_a_full_compile(
    kernel, syncer, monkeypatch
):
    view = frontends(100)  # 1000..1099: buckets 768 and 1024
    assert syncer.sync(list(view.values()), full=True)
    assert "TCPR-DT1024x256" in owned(kernel)["nat"]
    compiled: list[int] = []
    compile_rules = sync.compile_rules
    monkeypatch.setattr(
        sync, "compile_rules", lambda state, *a: compiled.append(len(state.frontends)) or compile_rules(state, *a)
    )
    joining = container(200, labels={"tcp.port": "1100"})
    assert syncer.sync([*view.values(), joining])
    declared = [line for line in kernel.scripts[-1].splitlines() if line.startswith(":")]
    assert sorted(declared) == [":TCPR-DT1024x256 - [0:0]", ":TCPR-FE-1100 - [0:0]"]
    assert max(compiled) <= 77  # the frontends of bucket 1024 (1024..1100), not all 101
    assert owned(kernel) == expected([*view.values(), joining])
    assert not syncer.drifted()
    apart = container(201, labels={"tcp.port": "1300"})  # a new bucket: the range above it changes too
    assert syncer.sync([*view.values(), joining, apart])
    declared = [line for line in kernel.scripts[-1].splitlines() if line.startswith(":")]
    assert sorted(declared) == [":TCPR-DT0x4096 - [0:0]", ":TCPR-DT1280x256 - [0:0]", ":TCPR-FE-1300 - [0:0]"]
    assert owned(kernel) == expected([*view.values(), joining, apart])


def test_the_drift_check_skips_bucket_chains_and_the_resync_repairs_them(kernel, syncer, monkeypatch):
    view = list(frontends(100).values())
    assert syncer.sync(view, full=True)
    listed: list[str] = []
    list_chain = kernel.list_chain
    monkeypatch.setattr(kernel, "list_chain", lambda table, chain: listed.append(chain) or list_chain(table, chain))
    kernel.delete_rule("nat", "TCPR-DT1024x256", 0)
    assert not syncer.drifted()
    assert "TCPR-FRONTENDS" in listed and not [chain for chain in listed if chain.startswith("TCPR-DT")]
    assert syncer.sync(view, full=True)
    assert owned(kernel) == expected(view) and drift_repairs(syncer.metrics) == 1


def test_a_full_sync_reads_the_tables_once(kernel, syncer, monkeypatch):
    """Docker's published ports come from the same read as the diff, not from a read of its chain first."""
    listed: list[tuple[str, str]] = []
    monkeypatch.setattr(kernel, "list_chain", lambda table, chain: listed.append((table, chain)))
    kernel.insert_rule("nat", "DOCKER", "-p tcp -m tcp --dport 81 -j DNAT --to-destination 172.17.0.9:80")
    view = [container(1), container(2, labels={"tcp.port": "81"})]
    reads = kernel.reads
    assert syncer.sync(view, full=True)
    assert kernel.reads == reads + 1 and listed == []
    assert [r.reason for r in syncer.state.rejections] == ["port_in_use"]  # 81 is Docker's, seen in that read


def test_the_owner_s_policy_set_after_construction_is_applied(kernel, syncer):
    """The daemon builds its syncers first and gives them the owner's options later (run.owner_options): the
    policy in them decides who may claim a port from the next sync on."""
    view = [container(1, labels={"tcp.port": "80"}), container(2, labels={"tcp.port": "9000"})]
    assert syncer.sync(view, full=True)
    assert set(syncer.state.frontends) == {80, 9000}
    syncer.options = dataclasses.replace(syncer.options, policy=Policy(allowed_ports=parse_ports("80")))
    assert syncer.sync(view)
    assert set(syncer.state.frontends) == {80}
    assert [r.reason for r in syncer.state.rejections] == ["port_not_allowed"]
    assert "TCPR-FE-9000" not in owned(kernel)["nat"]


def test_the_first_sync_logs_one_line_and_later_ones_a_line_per_backend(syncer, caplog):
    caplog.set_level("INFO", logger="tcprouter.sync")
    assert syncer.sync([container(1), container(2)], full=True)
    assert [r.getMessage() for r in caplog.records] == ["first sync: routing 1 frontends, 2 backends"]
    caplog.clear()
    assert syncer.sync([container(1), container(2), container(3)], causes={container(3).id: "start"})
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"frontend 80: +backend {container(3).name} ") and line.endswith("(start)")
