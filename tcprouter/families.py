"""Dual stack: one Syncer per address family over the same view, each with its own writer (iptables, ip6tables of
the same flavour) and its own belief of what its tables hold; the runner drives them as one.

On nft hosts the kernel numbers the ruleset's generations (netfilter.ruleset_generation): when the generation has
moved by exactly the commits of our own writes since the families' beliefs last matched the kernel, nobody else
changed any table, so a periodic resync need not read 110,000 rules back, nor the drift check list any chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Collection, Mapping, Sequence

from . import heap
from .compiler import Options
from .model import ContainerSnapshot, Family
from .netfilter import NetfilterError
from .sync import Syncer
from .tracker import Endpoint

log = logging.getLogger(__name__)


class FamilySyncers:
    """The runner's syncer for several families: a sync writes each family's rules in turn (IPv4 first) and
    succeeds when every family's write did; a family whose write failed is repaired with the others' at the
    runner's next (full) sync."""

    def __init__(self, syncers: Mapping[Family, Syncer], generation: Callable[[], int] | None = None) -> None:
        """`generation`: the ruleset generation of the tables the syncers write (nft hosts), or None."""
        self.syncers = dict(sorted(syncers.items(), key=lambda item: list(Family).index(item[0])))
        self._generation = generation
        self.known: int | None = None  # the generation at which every family's belief matches its tables

    def generation(self) -> int | None:
        if self._generation is None:
            return None
        try:
            return self._generation()
        except NetfilterError as error:
            log.warning("%s: reading the tables in full instead", error)
            return None

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
        """Syncer.sync of each family, every one whatever the others did (a failed family resyncs in full). A full
        sync reads the tables back unless the generation says that they are as our last writes left them."""
        before = self.generation()
        unchanged = before is not None and before == self.known
        commits = self.commits()
        with heap.collector_paused() if full else contextlib.nullcontext():  # ~1,000,000 objects at 10,000 x 10
            results = [
                syncer.sync(view, unreachable, full, causes, changed, read_kernel=not unchanged)
                for syncer in self.syncers.values()
            ]
        after = self.generation()
        # Beliefs match the tables if they did at `before` (a full sync's reads happen after it), every write
        # succeeded, and no one but us committed in between.
        in_step = (full or unchanged) and all(results)
        ours = self.commits() - commits
        self.known = after if in_step and before is not None and after == before + ours else None
        return all(results)

    def commits(self) -> int:
        return sum(syncer.commits for syncer in self.syncers.values())

    def drifted(self) -> bool:
        """Whether a rule of ours was changed by someone else: no if the generation has not moved since the beliefs
        last matched the tables; else each family's cheap check of its shared chains."""
        if self.known is not None and self.generation() == self.known:
            return False
        return any([syncer.drifted() for syncer in self.syncers.values()])  # each logs its own drift

    def remote_endpoints(self) -> dict[Endpoint, str]:
        """Remote backends are reached over IPv4 (their hosts' addresses): the prober watches the IPv4 syncer's."""
        return next(iter(self.syncers.values())).remote_endpoints()
