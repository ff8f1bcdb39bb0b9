"""One sync: the tracker's view -> desired state -> rules -> the smallest write that makes the kernel hold them.

Partial syncs diff against what was last written; full syncs (at start, periodically, on drift, after a
failure) diff against what the kernel really holds. Rules are never flushed first and stay in place when
tcprouter stops. A failed write is retried from a fresh read; if it still fails, the rules in force stay.
Once the rules are written, the conntrack entries of the flows of backends that left are deleted (stale_flows).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from . import hostports
from .compiler import Options, RuleSet, Tables, compile_rules, frontend_of
from .diff import believed_tables, hook_in_place, owned, restore_script
from .labels import DEFAULT_UDP_PREFIX, desired_state, reachable_only
from .metrics import Metrics
from .model import ContainerSnapshot, DesiredState, Protocol
from .netfilter import NetfilterError, Writer
from .tracker import Endpoint

log = logging.getLogger(__name__)
# Deletes the conntrack entries of (protocol, backend endpoints, connection mark bit); returns how many went.
FlowForgetter = Callable[[Protocol, Collection[Endpoint], int], int]


class Syncer:
    def __init__(
        self,
        writer: Writer,
        options: Options,
        prefix: str,
        metrics: Metrics,
        udp_prefix: str = DEFAULT_UDP_PREFIX,
        forget_flows: FlowForgetter | None = None,
    ) -> None:
        self.writer = writer
        self.options = options
        self.prefix = prefix
        self.udp_prefix = udp_prefix
        self.metrics = metrics
        self.forget_flows = forget_flows  # None: conntrack entries are left to time out
        self.applied: Tables | None = None  # what we believe the kernel holds; None: read it first
        self.candidates = DesiredState(frontends={})  # the last desired state, before reachability was applied
        self.state = DesiredState(frontends={})  # the last state written
        self.busy_ports: dict[Protocol, dict[int, str]] = {}  # ports the host already uses (port -> who), last scanned
        self.retired: dict[str, Endpoint] = {}  # container id -> endpoint of TCP backends that left while running

    def desired(self, view: Sequence[ContainerSnapshot], full: bool) -> DesiredState:
        def compute() -> DesiredState:
            return desired_state(
                view,
                self.prefix,
                self.busy_ports.get(Protocol.TCP),
                self.options.policy,
                self.udp_prefix,
                self.busy_ports.get(Protocol.UDP),
            )

        state = compute()
        appeared = any(set(state.pools(p)) - set(self.state.pools(p)) for p in Protocol)
        if full or appeared:
            # The listener scan reads every socket of the host (TIME_WAIT included): only at full syncs
            # and when a frontend port appears, not on every event.
            self.busy_ports = {p: scan_busy_ports(self.writer, self.options.route_localhost, p) for p in Protocol}
            state = compute()
        return state

    def sync(
        self,
        view: Sequence[ContainerSnapshot],
        unreachable: Collection[Endpoint] = (),
        full: bool = False,
        causes: Mapping[str | Endpoint, str] | None = None,
    ) -> bool:
        """Write the difference between the desired rules and the kernel (full) or our last write."""
        kind = "full" if full else "partial"
        candidates = self.desired(view, full)
        state = reachable_only(candidates, unreachable).of_family(self.options.family)  # this writer's family
        started = time.perf_counter()
        try:
            for attempt in Retrying(
                stop=stop_after_attempt(3),
                wait=wait_exponential(multiplier=0.05, max=1),
                retry=retry_if_exception_type(NetfilterError),
                before_sleep=_log_retry,
                reraise=True,
            ):
                with attempt:
                    try:
                        rules = self._write(state, full=full or attempt.retry_state.attempt_number > 1)
                    except NetfilterError:
                        self.applied = None  # what a failed write left is unknown: the retry reads it
                        raise
        except NetfilterError as error:
            self.metrics.sync_failures.inc()
            log.error("sync failed, the rules in force stay as they were: %s", error)
            return False
        self.metrics.sync_duration.labels(kind).observe(time.perf_counter() - started)
        self.metrics.last_sync.set_to_current_time()
        log_changes(self.state, state, causes or {})
        stale, self.retired = stale_flows(self.state, state, view, self.retired)
        self.state, self.candidates = state, candidates
        self._forget(stale)
        self.metrics.state.publish(state, self.options.family)
        log.debug("%s sync: %d owned rules", kind, rules.rule_count())
        return True

    def _forget(self, stale: Mapping[Protocol, Collection[Endpoint]]) -> None:
        """Delete the conntrack entries of the flows that `stale` names; a failure is logged (they time out)."""
        if self.forget_flows is None:
            return
        for protocol, endpoints in stale.items():
            if not endpoints:
                continue
            try:
                deleted = self.forget_flows(protocol, endpoints, self.options.mark_bit)
            except OSError as error:
                log.warning(
                    "could not delete the %s flows of backends that left (they will time out): %s", protocol, error
                )
                continue
            self.metrics.flows_forgotten.labels(str(protocol)).inc(deleted)
            log.info(
                "deleted %d %s conntrack entries of backends that left (%s)",
                deleted,
                protocol.upper(),
                ", ".join(f"{ip}:{port}" for ip, port in sorted(endpoints)),
            )

    def _write(self, state: DesiredState, full: bool) -> RuleSet:
        current = self.writer.read()[0] if full or self.applied is None else self.applied
        parent = "DOCKER-USER" if "DOCKER-USER" in current.get("filter", {}) else "FORWARD"
        rules = compile_rules(state, dataclasses.replace(self.options, forward_parent=parent))
        script = restore_script(current, rules)
        if full and self.applied is not None and script != restore_script(self.applied, rules):
            # The kernel's owned rules are not what the last write left: someone changed them. Counted here,
            # where the repair is written, whichever check or timer found it.
            log.warning("drift: rules changed by someone else are repaired")
            self.metrics.drift_repairs.inc()
        if script:
            self.writer.restore(script)
        self.applied = believed_tables(rules)
        return rules

    def drifted(self) -> bool:
        """Cheap check of the chains every flow crosses; a per-frontend edit waits for the full resync."""
        if self.applied is None:
            return True
        try:
            for table, chains in self.applied.items():
                for chain, rules in chains.items():
                    if frontend_of(chain) is not None:
                        continue
                    found = self.writer.list_chain(table, chain)
                    in_place = (
                        found == rules if owned(chain) else found is not None and hook_in_place(chain, found, rules[0])
                    )
                    if not in_place:
                        log.warning("drift: %s chain %s was changed by someone else; resyncing", table, chain)
                        return True
        except NetfilterError as error:
            log.warning("drift check failed: %s", error)
            return True
        return False

    def remote_endpoints(self) -> dict[Endpoint, str]:
        """Every remote backend that should be serving (reachable or not): endpoint -> node, for the prober."""
        return {b.endpoint: b.node for f in self.candidates.frontends.values() for b in f.backends if b.node}


def stale_flows(
    before: DesiredState, after: DesiredState, view: Sequence[ContainerSnapshot], retired: Mapping[str, Endpoint]
) -> tuple[dict[Protocol, set[Endpoint]], dict[str, Endpoint]]:
    """The backend endpoints whose conntrack entries are stale after a sync, per protocol, and the new `retired`.

    A UDP backend's as soon as it leaves its pool (stop, die, unhealthy, removed): a datagram flow has no end, and
    its entry would keep sending the client to the backend that left. A TCP backend's only once its container is
    gone (died, removed, not running): a draining or unhealthy one still finishes its connections, so one that
    leaves while running is `retired` until its container is gone (or it comes back).
    """
    running = {c.id for c in view if c.running}
    kept = {p: {b.endpoint for f in after.pools(p).values() for b in f.backends} for p in Protocol}
    udp = {b.endpoint for f in before.udp_frontends.values() for b in f.backends} - kept[Protocol.UDP]
    tcp = {b.container_id: b.endpoint for f in before.frontends.values() for b in f.backends} | dict(retired)
    left = {cid: endpoint for cid, endpoint in tcp.items() if endpoint not in kept[Protocol.TCP]}
    gone = {endpoint for cid, endpoint in left.items() if cid not in running}
    return {Protocol.TCP: gone, Protocol.UDP: udp}, {cid: e for cid, e in left.items() if cid in running}


def scan_busy_ports(writer: Writer, route_localhost: bool, protocol: Protocol = Protocol.TCP) -> dict[int, str]:
    """The ports of `protocol` the host already uses: its listeners (loopback ones too with --route-localhost) and
    the ports Docker publishes with DNAT rules in its nat chain."""
    try:
        docker_chain = writer.list_chain("nat", hostports.DOCKER_NAT_CHAIN) or ()
    except NetfilterError as error:
        log.warning("could not read Docker's published ports: %s", error)
        docker_chain = ()
    return hostports.busy_ports(docker_chain, route_localhost, protocol)


def _log_retry(retry_state: RetryCallState) -> None:
    log.warning(
        "rule write failed (attempt %d), retrying from the kernel's state: %s",
        retry_state.attempt_number,
        retry_state.outcome.exception() if retry_state.outcome else "",
    )


def log_changes(before: DesiredState, after: DesiredState, causes: Mapping[str | Endpoint, str]) -> None:
    """One line per backend that joined or left, with what caused it (a Docker event, a task, a probe, resync)."""
    for protocol in Protocol:
        was, now = before.pools(protocol), after.pools(protocol)
        name = "frontend" if protocol is Protocol.TCP else f"{protocol.upper()} frontend"
        for port in sorted(set(was) | set(now)):
            old = set(was[port].backends) if port in was else set()
            new = set(now[port].backends) if port in now else set()
            for sign, moved in (("+", new - old), ("-", old - new)):
                for b in sorted(moved, key=lambda b: b.name):
                    cause = causes.get(b.container_id) or causes.get(b.endpoint) or "resync"
                    where = f" on {b.node}" if b.node else ""
                    log.info(
                        "%s %d: %sbackend %s %s:%d%s (%s)",
                        name,
                        port,
                        sign,
                        b.name,
                        b.ip,
                        b.port,
                        where,
                        cause,
                        extra={
                            "frontend": port,
                            "protocol": str(protocol),
                            "backend": b.name,
                            "node": b.node,
                            "change": sign,
                            "cause": cause,
                        },
                    )
    for rejection in set(after.rejections) - set(before.rejections):
        log.warning("%s", rejection, extra={"container": rejection.name, "reason": rejection.reason})
    for warning in set(after.warnings) - set(before.warnings):
        log.warning("%s", warning)
