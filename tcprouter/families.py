"""Dual stack: one Syncer per address family over the same view, each with its own writer (iptables, ip6tables of
the same flavour) and its own belief of what its tables hold; the runner drives them as one."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

from .compiler import Options
from .model import ContainerSnapshot, Family
from .sync import Syncer
from .tracker import Endpoint


class FamilySyncers:
    """The runner's syncer for several families: a sync writes each family's rules in turn (IPv4 first) and
    succeeds when every family's write did; a family whose write failed is repaired with the others' at the
    runner's next (full) sync."""

    def __init__(self, syncers: Mapping[Family, Syncer]) -> None:
        self.syncers = dict(sorted(syncers.items(), key=lambda item: list(Family).index(item[0])))

    @property
    def options(self) -> Options:
        return next(iter(self.syncers.values())).options

    @options.setter
    def options(self, options: Options) -> None:
        """The owner's options, each syncer keeping its family."""
        for family, syncer in self.syncers.items():
            syncer.options = dataclasses.replace(options, family=family)

    def sync(
        self,
        view: Sequence[ContainerSnapshot],
        unreachable: Collection[Endpoint] = (),
        full: bool = False,
        causes: Mapping[str | Endpoint, str] | None = None,
        changed: Mapping[str, ContainerSnapshot | None] | None = None,
    ) -> bool:
        """Syncer.sync of each family, every one whatever the others did (a failed family resyncs in full)."""
        results = [syncer.sync(view, unreachable, full, causes, changed) for syncer in self.syncers.values()]
        return all(results)

    def drifted(self) -> bool:
        return any([syncer.drifted() for syncer in self.syncers.values()])  # each logs its own drift

    def remote_endpoints(self) -> dict[Endpoint, str]:
        """Remote backends are reached over IPv4 (their hosts' addresses): the prober watches the IPv4 syncer's."""
        return next(iter(self.syncers.values())).remote_endpoints()
