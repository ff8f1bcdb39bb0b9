"""The ruleset generation (nft hosts): a resync or drift check of tables that only our own writes changed reads
nothing back; any other commit, or a generation that cannot be read, makes them read again."""

from __future__ import annotations

import dataclasses

import pytest

from tcprouter.compiler import Options
from tcprouter.families import FamilySyncers
from tcprouter.metrics import Metrics
from tcprouter.model import Family
from tcprouter.netfilter import Flavour, Iptables, NetfilterError, RulesetGeneration, ruleset_generation
from tcprouter.sync import Syncer

from .fakes import FakeKernel
from .strategies import container
from .support import private_netns, sh


def _dual(i: int):
    """Container c<i> on a network created with --ipv6: 10.9.0.<i+1> and fd00:9::<i+1>."""
    return container(i, networks6={"bridge": f"fd00:9::{i + 1}"}, subnets6={"bridge": "fd00:9::/64"})


VIEW = [_dual(1), _dual(2)]


def _syncers(kernel4: FakeKernel, kernel6: FakeKernel) -> FamilySyncers:
    metrics = Metrics(lambda: ({}, []))
    # One nf_tables generation counts the commits of every table of every family: the sum of the fakes' counts.
    return FamilySyncers(
        {
            Family.IPV4: Syncer(kernel4, Options(), "tcp", metrics),
            Family.IPV6: Syncer(kernel6, Options(), "tcp", metrics),
        },
        lambda: kernel4.generation + kernel6.generation,
    )


def test_a_resync_after_only_our_own_writes_reads_nothing_and_writes_nothing():
    kernel4, kernel6 = FakeKernel(), FakeKernel()
    syncers = _syncers(kernel4, kernel6)
    assert syncers.sync(VIEW, full=True)
    assert (kernel4.reads, kernel6.reads) == (1, 1)
    assert syncers.sync(VIEW[:1], changed={VIEW[1].id: None})  # a partial sync: our own commits, counted
    written = len(kernel4.scripts)
    assert syncers.sync(VIEW[:1], full=True)
    assert (kernel4.reads, kernel6.reads) == (1, 1) and len(kernel4.scripts) == written
    kernel4.listed = 0
    assert not syncers.drifted() and kernel4.listed == 0  # not one chain listed


def test_a_commit_by_someone_else_makes_the_resync_read_and_repair():
    kernel4, kernel6 = FakeKernel(), FakeKernel()
    syncers = _syncers(kernel4, kernel6)
    assert syncers.sync(VIEW, full=True)
    written = list(kernel4.tables["nat"]["TCPR-FE-80"])
    kernel4.flush("nat", "TCPR-FE-80")  # someone flushed one of our frontend chains
    assert syncers.sync(VIEW, full=True)
    assert kernel4.reads == 2 and kernel6.reads == 2
    assert kernel4.tables["nat"]["TCPR-FE-80"] == written  # repaired
    assert syncers.known is not None  # in step again: the next resync reads nothing
    assert syncers.sync(VIEW, full=True) and kernel4.reads == 2


def test_a_commit_by_someone_else_is_seen_by_the_drift_check():
    kernel4, kernel6 = FakeKernel(), FakeKernel()
    syncers = _syncers(kernel4, kernel6)
    assert syncers.sync(VIEW, full=True)
    kernel6.insert_rule("filter", "OUTPUT", "-j DROP")  # not ours: the generation moves, nothing of ours drifted
    assert not syncers.drifted() and kernel4.listed > 0
    kernel4.flush("nat", "TCPR-FRONTENDS")
    assert syncers.drifted()


def test_without_a_generation_every_resync_reads():
    kernel4, kernel6 = FakeKernel(), FakeKernel()

    def broken() -> int:
        raise NetfilterError("cannot read the nf_tables generation: EPERM")

    for generation in (None, broken):
        syncers = _syncers(kernel4, kernel6)
        syncers._generation = generation
        reads = kernel4.reads
        assert syncers.sync(VIEW, full=True) and syncers.sync(VIEW, full=True)
        assert kernel4.reads == reads + 2 and syncers.known is None


def test_a_failed_write_leaves_the_tables_unknown():
    kernel4, kernel6 = FakeKernel(), FakeKernel()
    syncers = _syncers(kernel4, kernel6)
    assert syncers.sync(VIEW, full=True)

    def refuse(script: str) -> None:
        raise NetfilterError("iptables-restore: line 2 failed")

    kernel6.restore = refuse  # type: ignore[method-assign]
    assert not syncers.sync(VIEW[:1], changed={VIEW[1].id: None})
    assert syncers.known is None


@pytest.mark.parametrize("families", [(Family.IPV4,), (Family.IPV4, Family.IPV6)])
def test_the_kernels_generation_counts_exactly_our_commits(families):
    """Real nf_tables in a private namespace: after our writes (both families share one count) the resync reads
    nothing; an `iptables-nft` edit of one of our chains there is seen and repaired."""
    if not sh("sh", "-c", "command -v iptables-nft-restore", check=False):
        pytest.skip("iptables-nft is not installed")
    with private_netns() as ns:
        kernels = {f: CountingIptables(Flavour.NFT, netns=ns, family=f) for f in families}
        metrics = Metrics(lambda: ({}, []))
        generation = RulesetGeneration(ns)  # one socket for every read, as the daemon's
        syncers = FamilySyncers(
            {f: Syncer(k, Options(family=f), "tcp", metrics) for f, k in kernels.items()}, generation
        )
        view = VIEW
        assert syncers.sync(view, full=True) and syncers.known == ruleset_generation(ns)
        assert syncers.sync(view[:1], changed={view[1].id: None})
        assert syncers.known == ruleset_generation(ns)
        reads = sum(k.reads for k in kernels.values())
        assert syncers.sync(view[:1], full=True) and sum(k.reads for k in kernels.values()) == reads
        assert not syncers.drifted()
        sh("ip", "netns", "exec", ns, "iptables-nft", "-t", "nat", "-F", "TCPR-FRONTENDS")
        assert syncers.drifted()
        assert syncers.sync(view[:1], full=True)
        assert sum(k.reads for k in kernels.values()) == reads + len(families)
        assert kernels[Family.IPV4].list_chain("nat", "TCPR-FRONTENDS")  # repaired
        assert syncers.known == ruleset_generation(ns)
        generation.close()


def test_a_kept_generation_reader_follows_commits_and_reports_a_missing_namespace():
    with private_netns() as ns:
        generation = RulesetGeneration(ns)
        first = generation()
        sh("ip", "netns", "exec", ns, "nft", "add", "table", "ip", "tcpr-test-generation")
        assert generation() == ruleset_generation(ns) == first + 1
        generation.close()
    with pytest.raises(NetfilterError, match="cannot read the nf_tables generation"):
        RulesetGeneration(ns)()


@dataclasses.dataclass(frozen=True)
class CountingIptables(Iptables):
    """The real writer, counting its full reads."""

    reads_box: list[int] = dataclasses.field(default_factory=lambda: [0])

    @property
    def reads(self) -> int:
        return self.reads_box[0]

    def read(self, counters: bool = False):
        self.reads_box[0] += 1
        return super().read(counters)
