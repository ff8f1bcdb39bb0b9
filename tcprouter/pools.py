"""The desired state kept per frontend, so that a change costs what it touches, not what the host holds.

labels.desired_state is pure, and what it decides for one frontend depends only on the containers that claim that
frontend (its protocol and port: their pool, its owner, its conflicts) and on whether the host uses the port; a
container with no valid port label depends on nothing else at all. So the containers are grouped by the frontend
they claim (a container with a TCP and a UDP frontend is in two groups), and labels.protocol_frontends runs again
for a group only when one of its containers changed (kube-proxy's change trackers play this part for services):
the union of the groups' results is desired_state of every container.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

from .labels import DEFAULT_UDP_PREFIX, claims, protocol_frontends
from .model import MAPS_KEPT, ContainerSnapshot, DesiredState, Frontend, PortMap, Protocol, Rejection
from .policy import DEFAULT_POLICY, Policy

_DECIMAL = re.compile(r"[0-9]{1,6}")
# (protocol, the port its containers claim); a container without a valid port is a group of its own (its id);
# protocol None: a container whose Docker data could not be read (rejected `malformed`, whatever its labels).
Group = tuple[Protocol | None, int | str]
BusyPorts = Mapping[Protocol, Mapping[int, str]]


@dataclass(frozen=True)
class _Result:
    frontend: Frontend | None
    rejections: tuple[Rejection, ...]
    warnings: tuple[str, ...]


@functools.lru_cache(maxsize=MAPS_KEPT)
def _claimed_ports(
    labels: Mapping[str, str], prefix: str, udp_prefix: str
) -> tuple[tuple[tuple[Protocol, int | None], ...], bool]:
    """The protocols a label map claims frontends of, each with its port as labels.parse_backend reads it (None:
    no valid port), and whether every port is valid. Kept per label map (a snapshot's: model.FrozenMap): the
    replicas of a service share theirs."""
    found = []
    for protocol in claims(labels, prefix, udp_prefix):
        raw = labels.get(f"{udp_prefix if protocol is Protocol.UDP else prefix}.port", "").strip()
        found.append((protocol, int(raw) if _DECIMAL.fullmatch(raw) else None))
    return tuple(found), all(port is not None for _, port in found)


class Pools:
    """labels.desired_state of every container, kept up to date one changed container at a time."""

    def __init__(self, prefix: str, policy: Policy = DEFAULT_POLICY, udp_prefix: str = DEFAULT_UDP_PREFIX) -> None:
        self.prefixes = {Protocol.TCP: prefix, Protocol.UDP: udp_prefix}
        self.policy = policy
        self.busy_ports: dict[Protocol, dict[int, str]] = {p: {} for p in Protocol}
        self.containers: dict[str, ContainerSnapshot] = {}  # its groups are derived again: groups() is kept per map
        self._members: dict[Group, dict[str, ContainerSnapshot]] = {}
        self._pools = {p: PortMap() for p in Protocol}  # the state's, per protocol (shared with the states given)
        self._rejections: dict[Group, tuple[Rejection, ...]] = {}
        self._warnings: dict[Group, tuple[str, ...]] = {}

    def groups(self, container: ContainerSnapshot) -> tuple[Group, ...]:
        """The frontends the container claims (as labels.parse_backend reads their ports), else its id."""
        if container.malformed:
            return ((None, container.id),)
        claimed, valid = _claimed_ports(container.labels, self.prefixes[Protocol.TCP], self.prefixes[Protocol.UDP])
        if valid:
            return cast(tuple[Group, ...], claimed)  # the kept tuple: one per label map, not one per container
        return tuple((protocol, container.id if port is None else port) for protocol, port in claimed)

    def changes(self, view: Iterable[ContainerSnapshot]) -> dict[str, ContainerSnapshot | None]:
        """What differs between `view` (every container) and what is held: id -> its snapshot, None if gone.
        Snapshots are immutable: the same object is the same container, unchanged."""
        changed: dict[str, ContainerSnapshot | None] = {}
        seen = set()
        for snapshot in view:
            seen.add(snapshot.id)
            held = self.containers.get(snapshot.id)
            if held is None or (held is not snapshot and held != snapshot):
                changed[snapshot.id] = snapshot
        changed.update((cid, None) for cid in self.containers.keys() - seen)
        return changed

    def update(
        self, changed: Mapping[str, ContainerSnapshot | None], busy_ports: BusyPorts, policy: Policy | None = None
    ) -> set[int]:
        """Fold changed containers (id -> snapshot, None: gone), the host's busy ports and the policy (None: the
        same) in; the frontend ports (of either protocol) whose result may have changed."""
        dirty: set[Group] = set()
        if policy is not None and policy != self.policy:
            self.policy = policy
            dirty.update(self._members)  # who may claim which port changed: every group again
        for cid, snapshot in changed.items():
            held = self.containers.pop(cid, None)
            for old in self.groups(held) if held is not None else ():
                del self._members[old][cid]
                dirty.add(old)
            if snapshot is not None:
                self.containers[cid] = snapshot
                for new in self.groups(snapshot):
                    self._members.setdefault(new, {})[cid] = snapshot
                    dirty.add(new)
        for protocol in Protocol:
            before, now = self.busy_ports[protocol], busy_ports.get(protocol, {})
            if now != before:
                dirty.update((protocol, p) for p in before.keys() | now.keys() if before.get(p) != now.get(p))
                self.busy_ports[protocol] = dict(now)
        pools: dict[Protocol, dict[int, Frontend | None]] = {p: {} for p in Protocol}
        for group in dirty:
            protocol, key = group
            frontend = self._recompute(group)
            if protocol is not None and isinstance(key, int):
                pools[protocol][key] = frontend
        self._pools = {p: self._pools[p].updated(pools[p]) for p in Protocol}
        return {port for _, port in dirty if isinstance(port, int)}

    def _recompute(self, group: Group) -> Frontend | None:
        """Read the group's containers again: keep its rejections and warnings; its frontend, if any."""
        protocol = group[0]
        members = self._members.get(group)
        if not members:
            self._members.pop(group, None)
            result = _Result(None, (), ())
        elif protocol is None:
            result = _Result(
                None, tuple(Rejection(c.id, c.name, "malformed", c.malformed) for c in members.values()), ()
            )
        else:
            ordered = sorted(members.values(), key=lambda c: c.age_order)
            state = protocol_frontends(
                ordered, self.prefixes[protocol], protocol, self.busy_ports[protocol], self.policy
            )
            result = _Result(next(iter(state.frontends.values()), None), state.rejections, state.warnings)
        for kept, value in ((self._rejections, result.rejections), (self._warnings, result.warnings)):
            if value:
                kept[group] = value  # type: ignore[index]
            else:
                kept.pop(group, None)
        return result.frontend

    def state(self) -> DesiredState:
        """The desired state of every container held (as labels.desired_state gives it, up to the order of the
        rejections and warnings). The pools are immutable maps, shared with the last state but for what changed (this
        runs at every event), in no particular order: whoever needs an order sorts (every_frontend)."""
        return DesiredState(
            frontends=self._pools[Protocol.TCP],
            udp_frontends=self._pools[Protocol.UDP],
            rejections=tuple(r for rs in self._rejections.values() for r in rs),
            warnings=tuple(w for ws in self._warnings.values() for w in ws),
        )
