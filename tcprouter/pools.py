"""The desired state kept per frontend, so that a change costs what it touches, not what the host holds.

labels.desired_state is pure, and what it decides for one frontend port depends only on the containers that
claim that port (their pool, its owner, its conflicts) and on whether the host uses the port; a container with
no valid port label depends on nothing else at all. So the containers are grouped by the port they claim and
labels.desired_state runs again for a group only when one of its containers changed (kube-proxy's change
trackers play this part for services): the union of the groups' results is desired_state of every container.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .labels import desired_state
from .model import ContainerSnapshot, DesiredState, Frontend, Rejection
from .policy import DEFAULT_POLICY, Policy

_DECIMAL = re.compile(r"[0-9]{1,6}")
Group = int | str  # the port a group's containers claim; a container without a valid one is a group of its own (its id)


@dataclass(frozen=True)
class _Result:
    frontend: Frontend | None
    rejections: tuple[Rejection, ...]
    warnings: tuple[str, ...]


class Pools:
    """labels.desired_state of every container, kept up to date one changed container at a time."""

    def __init__(self, prefix: str, policy: Policy = DEFAULT_POLICY) -> None:
        self.prefix = prefix
        self.policy = policy
        self.busy_ports: Mapping[int, str] = {}
        self.containers: dict[str, ContainerSnapshot] = {}
        self._group_of: dict[str, Group] = {}
        self._members: dict[Group, dict[str, ContainerSnapshot]] = {}
        self._frontends: dict[int, Frontend] = {}
        self._rejections: dict[Group, tuple[Rejection, ...]] = {}
        self._warnings: dict[Group, tuple[str, ...]] = {}
        self._sorted = True  # whether _frontends is in port order

    def group(self, container: ContainerSnapshot) -> Group:
        """The port the container claims (as labels.parse_backend reads it), else its id."""
        raw = container.labels.get(f"{self.prefix}.port", "").strip()
        return int(raw) if _DECIMAL.fullmatch(raw) else container.id

    def changes(self, view: Iterable[ContainerSnapshot]) -> dict[str, ContainerSnapshot | None]:
        """What differs between `view` (every container) and what is held: id -> its snapshot, None if gone.
        Snapshots are immutable: the same object is the same container, unchanged."""
        changed: dict[str, ContainerSnapshot | None] = {}
        seen = set()
        for snapshot in view:
            seen.add(snapshot.id)
            held = self.containers.get(snapshot.id)
            if held is not snapshot and held != snapshot:
                changed[snapshot.id] = snapshot
        changed.update((cid, None) for cid in self.containers.keys() - seen)
        return changed

    def update(self, changed: Mapping[str, ContainerSnapshot | None], busy_ports: Mapping[int, str]) -> set[int]:
        """Fold changed containers (id -> snapshot, None: gone) and the host's busy ports in; the frontend ports
        whose result may have changed."""
        dirty: set[Group] = set()
        for cid, snapshot in changed.items():
            old = self._group_of.pop(cid, None)
            if old is not None:
                del self._members[old][cid]
                dirty.add(old)
            self.containers.pop(cid, None)
            if snapshot is not None:
                new = self.group(snapshot)
                self.containers[cid] = self._members.setdefault(new, {})[cid] = snapshot
                self._group_of[cid] = new
                dirty.add(new)
        if busy_ports != self.busy_ports:
            before, self.busy_ports = self.busy_ports, dict(busy_ports)
            dirty.update(p for p in before.keys() | busy_ports.keys() if before.get(p) != busy_ports.get(p))
        for group in dirty:
            self._recompute(group)
        return {group for group in dirty if isinstance(group, int)}

    def _recompute(self, group: Group) -> None:
        members = self._members.get(group)
        if not members:
            self._members.pop(group, None)
            result = _Result(None, (), ())
        else:
            state = desired_state(members.values(), self.prefix, self.busy_ports, self.policy)
            result = _Result(next(iter(state.frontends.values()), None), state.rejections, state.warnings)
        for kept, value in ((self._rejections, result.rejections), (self._warnings, result.warnings)):
            if value:
                kept[group] = value  # type: ignore[index]
            else:
                kept.pop(group, None)
        if isinstance(group, int):
            if result.frontend is None:
                self._frontends.pop(group, None)
            else:
                self._sorted = self._sorted and group in self._frontends
                self._frontends[group] = result.frontend

    def state(self) -> DesiredState:
        """The desired state of every container held (as labels.desired_state gives it, up to the order of the
        rejections and warnings)."""
        if not self._sorted:
            self._frontends, self._sorted = dict(sorted(self._frontends.items())), True
        return DesiredState(
            frontends=dict(self._frontends),
            rejections=tuple(r for rs in self._rejections.values() for r in rs),
            warnings=tuple(w for ws in self._warnings.values() for w in ws),
        )
