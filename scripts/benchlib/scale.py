"""Scale: synthetic desired states of N frontends x 10 backends, in private network namespaces.

Nothing here touches the host's tables, so no lock is taken. The pipeline timed is the daemon's own:
labels.desired_state (container snapshots -> frontends), compiler.compile_rules, diff.restore_script
against either the kernel's tables (a full sync: Iptables.read first) or what was last written (a
partial sync: diff.believed_tables), and Iptables.restore (one iptables-restore --noflush).

Synthetic backends get addresses in 198.18.0.0/15 (RFC 2544, reserved for benchmarks); no packet is
ever sent to them. The first-packet test routes only to a server namespace behind a router namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import inspect
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from tcprouter.compiler import Options, RuleSet, compile_rules
from tcprouter.diff import believed_tables, restore_script
from tcprouter.labels import LabelKeys, desired_state
from tcprouter.metrics import Metrics
from tcprouter.model import ContainerSnapshot, DesiredState, Protocol, timestamp_ns
from tcprouter.netfilter import Flavour, Iptables, Nft, detect_flavour
from tcprouter.sync import Syncer
from tests.support import in_netns

from .common import CLIENT_SUBNET, log, median, netns_add, percentile, sh, tune_client, veth

FIRST_PORT = 20000
BACKENDS_PER_FRONTEND = 10
EPOCH = datetime.datetime(2026, 1, 1)  # the synthetic containers' creation times start here
SERVER_NET = "198.19.255"  # the server side of the first-packet topology (RFC 2544 range)
OPTIONS = Options(forward_parent="FORWARD")  # a namespace has no DOCKER-USER
DISPATCH_FRONTENDS = 10_000  # the first-packet comparison of the flat dispatch and the tree
PARTIAL_EVENTS = 40  # at least: a p50 of a dozen 1-2 ms events moved by ~50% between runs on a noisy host
# Older code holds a snapshot's times as Docker's text, this one as integers (model.timestamp_ns)
_TIMES_AS_TEXT = ContainerSnapshot.__dataclass_fields__["created"].type == "str"


def _address(k: int) -> str:
    k += 1
    return f"198.{18 + k // 65536}.{(k // 256) % 256}.{k % 256}"


def _docker_time(k: int, offset: float = 0.0) -> str | int:
    """Docker's form of a time (RFC 3339, nanoseconds, UTC), k + `offset` seconds after the epoch of the synthetic
    containers, as a snapshot holds it: ns since the epoch (older code: the text)."""
    text = f"{(EPOCH + datetime.timedelta(seconds=k + offset)).isoformat()}.{k * 7919 % 10**9:09d}Z"
    return text if _TIMES_AS_TEXT else timestamp_ns(text)


def snapshots(
    frontends: int,
    per: int = BACKENDS_PER_FRONTEND,
    real: dict[int, list[str]] | None = None,
    first_port: int = FIRST_PORT,
) -> list[ContainerSnapshot]:
    """Labelled, running containers as discovery would report them: `frontends` x `per`.

    `real` maps a frontend index to the addresses its backends really have (the server namespace).
    """
    out = []
    for f in range(frontends):
        for j in range(per):
            k = f * per + j
            ip = real[f][j] if real and f in real else _address(k)
            out.append(
                ContainerSnapshot(
                    id=f"{k:064x}",
                    name=f"bench-fe{f}-be{j}",
                    created=_docker_time(k),
                    started_at=_docker_time(k, 1),  # its start, a second later
                    labels={"tcp.port": str(first_port + f), "tcp.backend_port": "80"},
                    running=True,
                    networks={"bench": ip},
                    subnets={"bench": "198.18.0.0/15"},
                    exposed_tcp_ports=(80,),
                )
            )
    return out


def _timed(fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def _full_sync(iptables: Iptables, state: DesiredState) -> dict[str, float]:
    (current, _), t_read = _timed(iptables.read)
    rules, t_compile = _timed(compile_rules, state, OPTIONS)
    script, t_diff = _timed(restore_script, current, rules)
    _, t_restore = _timed(iptables.restore, script)
    return {
        "read_s": t_read,
        "compile_s": t_compile,
        "diff_s": t_diff,
        "restore_s": t_restore,
        "total_s": t_read + t_compile + t_diff + t_restore,
        "script_lines": script.count("\n"),
    }


def _empty(iptables: Iptables) -> float:
    current, _ = iptables.read()
    _, took = _timed(iptables.restore, restore_script(current, RuleSet(chains={})))
    return took


def sync_figures(frontends: int, repeats: int) -> dict:
    flavour = detect_flavour()
    result: dict[str, object] = {"frontends": frontends, "backends": frontends * BACKENDS_PER_FRONTEND}
    with contextlib.ExitStack() as stack:
        ns = netns_add(stack, "tcpr-bench-k-")
        iptables = Iptables(flavour, netns=ns, timeout=120)
        containers = snapshots(frontends)
        state, t_labels = _timed(desired_state, containers)
        result["labels_s"] = t_labels

        fulls, empties = [], []
        for _ in range(repeats):
            fulls.append(_full_sync(iptables, state))
            empties.append(_empty(iptables))
        first = _full_sync(iptables, state)
        rules = compile_rules(state, OPTIONS)
        result["rule_count"] = rules.rule_count()
        result["full_sync_from_empty"] = _medians(fulls)
        result["full_sync_from_empty_max_total_s"] = max(f["total_s"] for f in fulls)
        result["full_resync_unchanged"] = _medians([_full_sync(iptables, state) for _ in range(repeats)])
        result["full_sync_first"] = first
        result["cleanup_s"] = median(empties)

        # One backend leaves (and comes back): the daemon's partial sync, against what it last wrote.
        middle = frontends // 2
        victim = containers[middle * BACKENDS_PER_FRONTEND + 3]
        partials, fulls_changed = [], []
        believed = believed_tables(rules)
        for i in range(2 * repeats):
            kept = [c for c in containers if c is not victim] if i % 2 == 0 else containers
            new_state, t_labels = _timed(desired_state, kept)
            new_rules, t_compile = _timed(compile_rules, new_state, OPTIONS)
            script, t_diff = _timed(restore_script, believed, new_rules)
            _, t_restore = _timed(iptables.restore, script)
            believed = believed_tables(new_rules)
            partials.append(
                {
                    "labels_s": t_labels,
                    "compile_s": t_compile,
                    "diff_s": t_diff,
                    "restore_s": t_restore,
                    "total_s": t_labels + t_compile + t_diff + t_restore,
                    "script_lines": script.count("\n"),
                    "rules_written": sum(1 for line in script.splitlines() if line.startswith("-A ")),
                    "chains_rewritten": sum(1 for line in script.splitlines() if line.startswith(":")),
                }
            )
        # The same change found by a full sync (reads the kernel first), e.g. the periodic resync.
        for i in range(2 * repeats):
            kept = [c for c in containers if c is not victim] if i % 2 == 0 else containers
            fulls_changed.append(_full_sync(iptables, desired_state(kept)))
        result.update(_daemon_syncs(iptables, containers, victim, repeats))
        current, _ = iptables.read()
        result["consistent_after"] = restore_script(current, compile_rules(state, OPTIONS)) == ""
        result["one_backend_change_partial"] = _medians(partials)
        result["one_backend_change_partial_max_total_s"] = max(p["total_s"] for p in partials)
        result["one_backend_change_full"] = _medians(fulls_changed)
        result["one_backend_change_example"] = _example_script(believed_tables(rules), state, victim, containers)
    return result


def _daemon_syncs(iptables: Iptables, containers: list[ContainerSnapshot], victim, repeats: int) -> dict:
    """The daemon's own Syncer.sync on this state: a full sync from empty tables, then partial syncs
    of one backend leaving and coming back (what a `docker kill` / `docker start` event costs it)."""
    fulls, partials, drift_checks = [], [], []
    for _ in range(repeats):
        _empty(iptables)
        syncer = Syncer(iptables, OPTIONS, "tcp", Metrics(lambda: []))
        without_victim = [c for c in containers if c.id != victim.id]
        ok, took = _timed(syncer.sync, containers, (), True)
        assert ok, "full sync failed"
        fulls.append(took)
        drifted, took = _timed(syncer.drifted)  # the once-a-second check, run in the same thread
        assert not drifted, "drift reported on tables just written"
        drift_checks.append(took)
        for _ in range(2):
            ok, took = _timed(syncer.sync, without_victim, (), False)
            partials.append(took)
            ok, took2 = _timed(syncer.sync, containers, (), False)
            partials.append(took2)
    return {
        "daemon_full_sync_s": {"p50": median(fulls), "max": max(fulls)},
        "daemon_partial_sync_s": {"p50": median(partials), "max": max(partials)},
        "daemon_drift_check_s": {"p50": median(drift_checks), "max": max(drift_checks)},
    }


def _example_script(believed, state, victim, containers) -> str:
    kept = [c for c in containers if c is not victim]
    return restore_script(believed, compile_rules(desired_state(kept), OPTIONS))


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: median([row[key] for row in rows]) for key in rows[0]}


# ---- the daemon's own syncs, old code beside new ------------------------------------------------------


def daemon_probe(frontends: int, repeats: int, flavour: Flavour | None = None, nat_tables: bool = False) -> dict:
    """Runs in a fresh interpreter, with whichever tcprouter is first on sys.path (the old commit's or this one's):
    the daemon's ChangeTracker and Syncer against a private namespace's tables. A full sync from empty tables, a
    resync with nothing changed, one backend leaving and coming back as Docker events (tracker.apply, then the
    sync of tracker.view(): what the daemon's thread spends on an event), /metrics scrapes, and the process's
    memory while it holds all that."""
    from prometheus_client import generate_latest

    from tcprouter.metrics import Metrics, kernel_reader
    from tcprouter.runner import Inbox
    from tcprouter.tracker import Change, ChangeTracker, Relist

    flavour = flavour or detect_flavour()  # a namespace's tables: either flavour can be measured on any host
    try:
        from tcprouter.daemon import GIL_SWITCH_INTERVAL  # as daemon.serve sets it (older code: Python's default)

        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    except ImportError:
        pass
    with contextlib.ExitStack() as stack:
        ns = netns_add(stack, "tcpr-bench-d-")
        restores: list[float] = []  # the seconds of each iptables-restore: the kernel write and the tool around it

        class TimedIptables(Iptables):
            def restore(self, *args, **kwargs):
                started = time.perf_counter()
                try:
                    return super().restore(*args, **kwargs)
                finally:
                    restores.append(time.perf_counter() - started)

        iptables = TimedIptables(flavour, netns=ns, timeout=300)
        options = dataclasses.replace(OPTIONS, nat_tables=True) if nat_tables else OPTIONS  # --nat nftables
        reader = kernel_reader(flavour, ns, timeout=300, **({"nat_tables": True} if nat_tables else {}))
        try:
            metrics = Metrics(reader, read_interval=10.0)
        except TypeError:  # the old commit reads the kernel at every scrape
            metrics = Metrics(reader)
        nat = {"nat_writer": Nft(ns, timeout=300)} if nat_tables else {}  # older code: no such writer
        syncer = _runner_syncer(Syncer(iptables, options, "tcp", metrics, **nat), flavour, ns)
        tracker = ChangeTracker("tcp")
        containers = snapshots(frontends)
        tracker.apply(Relist(tuple(containers)))
        ok, full = _timed(syncer.sync, tracker.view(), (), True)
        assert ok, "full sync failed"
        try:
            from tcprouter.runner import freeze_heap  # as the runner does after its first sync (older code: not)

            freeze_heap()
        except ImportError:
            pass
        try:
            from tcprouter.heap import give_back  # as the runner does after a full sync (older code: not)

            give_back()
        except ImportError:
            pass
        noops = [_timed(syncer.sync, tracker.view(), (), True)[1] for _ in range(repeats)]
        if hasattr(tracker, "take_changes"):
            tracker.take_changes()  # the relist's changes were synced
        victim = containers[(frontends // 2) * BACKENDS_PER_FRONTEND + 3]
        # The runner takes no view for a partial sync (older code: always a copy of it).
        lazy_view = "with_view" in inspect.signature(Inbox.take).parameters
        if hasattr(metrics.state, "settle"):  # events apart from the first metrics build (timed with one below)
            metrics.state.settle()

        own: list[float] = []  # each event's time outside iptables-restore: the daemon's own share

        def event(i: int) -> float:
            """One Docker event (the victim dies, or starts again) and the sync the runner makes of it."""
            change = Change(victim.id, "die", 0, gone=True) if i % 2 == 0 else Change(victim.id, "start", 0, victim)
            restores.clear()
            started = time.perf_counter()
            tracker.apply(change)
            # as the runner passes them: the containers that changed (older code: the view is compared)
            changed = {"changed": tracker.take_changes()} if hasattr(tracker, "take_changes") else {}
            view = () if lazy_view and changed.get("changed") is not None else tracker.view()
            assert syncer.sync(view, (), False, **changed), "partial sync failed"
            elapsed = time.perf_counter() - started
            own.append(elapsed - sum(restores))
            return elapsed

        partials = [event(i) for i in range(max(4 * repeats, PARTIAL_EVENTS))]
        own_share = own[:]
        # What the endpoint answers to Prometheus (which asks for gzip); the old code formatted its registry. The
        # first scrape after the start; then each one after an event, as on a host where containers come and go
        # between scrapes (the state changed: the new code builds its text again in the background meanwhile).
        scrape = (lambda: metrics.exposition(True)) if hasattr(metrics, "exposition") else None
        scrape = scrape or (lambda: generate_latest(metrics.registry))
        scrapes, during_builds = [], []
        for i in range(5 * repeats + 1):
            if i:
                during_builds.append(event(i))  # a scrape just started a build of the text in the background
            started = time.perf_counter()
            scrape()
            scrapes.append(time.perf_counter() - started)
        first_scrape, scrapes = scrapes[0], scrapes[1:]
        if hasattr(metrics.state, "settle"):  # the memory held between builds (older code: no background build)
            metrics.state.settle()
        # Before the check below: it compiles every rule of the state in iptables' form, the probe's own memory.
        status = Path("/proc/self/status").read_text()
        # After the memory was read: a read of the kernel's counters, then the text of the state and that read, as
        # a build makes them, timed apart (what a build costs the daemon's CPU, once per read interval while
        # scraped), the best of `repeats` each.
        collector = metrics.state
        reads = [_timed(collector._read)[1] for _ in range(repeats)]
        states, figures = getattr(collector, "_states", None), getattr(collector, "_figures", None)
        texts = [_timed(collector._serve, states, figures)[1] for _ in range(repeats)] if states is not None else []
        current, _ = iptables.read()
        consistent = restore_script(current, compile_rules(desired_state(tracker.view()), options)) == ""
    field = lambda key: int(next(x for x in status.splitlines() if x.startswith(key)).split()[1])  # noqa: E731
    return {
        "frontends": frontends,
        "full_sync_s": full,
        "noop_resync_s": {"p50": median(noops), "max": max(noops)},
        "partial_sync_s": {"p50": median(partials), "p90": percentile(partials, 90), "max": max(partials)},
        "partial_own_s": {"p50": median(own_share), "max": max(own_share)},
        "partial_during_build_s": {"p50": median(during_builds), "max": max(during_builds)},
        "first_scrape_s": first_scrape,
        "metrics_read_s": min(reads),
        "metrics_text_s": min(texts) if texts else None,
        "scrape_s": {"p50": median(scrapes), "p99": percentile(scrapes, 99), "max": max(scrapes)},
        "consistent_after": consistent,
        "vmrss_kb": field("VmRSS:"),
        "peak_kb": field("VmHWM:"),
    }


def _runner_syncer(syncer, flavour: Flavour, netns: str):
    """The syncer as the daemon's runner drives it: FamilySyncers with the nft ruleset generation (older code: the
    Syncer alone)."""
    try:
        from tcprouter.families import FamilySyncers
        from tcprouter.netfilter import ruleset_generation
    except ImportError:
        return syncer

    def one_socket_per_read() -> int:  # older code
        return ruleset_generation(netns)

    try:
        from tcprouter.netfilter import RulesetGeneration  # its socket kept open

        kept: Callable[[], int] = RulesetGeneration(netns)
    except ImportError:
        kept = one_socket_per_read
    generation = kept if flavour is Flavour.NFT else None
    try:
        return FamilySyncers({OPTIONS.family: syncer}, generation)
    except TypeError:  # FamilySyncers without the generation
        return syncer


def daemon_figures(sizes: list[int], repeats: int, code: Path | None = None, variant: Sequence[str] = ()) -> list[dict]:
    """daemon_probe at each size, each in a fresh interpreter, with the tcprouter of `code` (a checkout) or this one;
    `variant`: the probe's further arguments (flavour, nat side)."""
    scripts = Path(__file__).resolve().parent.parent
    path = [str(code)] if code else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(scripts), str(scripts.parent)])}
    rows = []
    for frontends in sizes:
        done = subprocess.run(
            [sys.executable, "-m", "benchlib.scale", "daemon", str(frontends), str(repeats), *variant],
            capture_output=True,
            text=True,
            check=True,
            cwd=code or scripts.parent,
            env=env,
        )
        rows.append(json.loads(done.stdout))
        log(f"daemon {frontends}x{BACKENDS_PER_FRONTEND} ({code or 'this tree'}): {rows[-1]}")
    return rows


def _pair(was: dict, now: dict, get, scale: float = 1.0, digits: int = 2) -> str:
    """`old / new` of one figure (`-` where the old code has none)."""
    a, b = get(was), get(now)
    old = f"{a * scale:,.{digits}f}" if a is not None else "-"
    return f"{old} / {b * scale:,.{digits}f}"


def compare_daemons(old: Path, sizes: list[int], repeats: int, variant: Sequence[str] = ()) -> str:
    """daemon_probe of the tcprouter in `old` (a checkout, e.g. a `git worktree` of an earlier commit) and of this
    tree, one after the other at each size (`variant`: the probe's flavour and nat side): a markdown table, old / new
    in each cell."""
    return _comparison(
        sizes, lambda frontends: [daemon_figures([frontends], repeats, code, variant)[0] for code in (old, None)]
    )


def compare_nat_sides(sizes: list[int], repeats: int) -> str:
    """daemon_probe of this tree on an nft host with the nat side in iptables, then in tcprouter's nftables tables
    (--nat nftables), one after the other at each size: iptables / nftables in each cell."""
    sides = (("nft", "iptables"), ("nft", "nftables"))
    return _comparison(sizes, lambda frontends: [daemon_figures([frontends], repeats, None, s)[0] for s in sides])


def _comparison(sizes: list[int], figures: Callable[[int], list[dict]]) -> str:
    """A markdown table of two daemon_probe figures per size (`figures(size)`): `first / second` in each cell."""
    rows = [
        "| size | full sync s | no-op resync s | partial sync ms p50 (new p90) | of which outside iptables-restore "
        "ms p50 | partial during a metrics build ms p50 | first scrape s | scrape ms p50 | scrape ms p99 | a metrics "
        "read s | its text s | VmRSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for frontends in sizes:
        was, now = figures(frontends)
        rows.append(
            f"| {frontends:,} x {BACKENDS_PER_FRONTEND} "
            f"| {_pair(was, now, lambda r: r['full_sync_s'])} "
            f"| {_pair(was, now, lambda r: r['noop_resync_s']['p50'], digits=3)} "
            f"| {_pair(was, now, lambda r: r['partial_sync_s']['p50'], 1e3, 1)} "
            f"({now['partial_sync_s']['p90'] * 1e3:.1f}) "
            f"| {_pair(was, now, lambda r: r['partial_own_s']['p50'], 1e3, 1)} "
            f"| {_pair(was, now, lambda r: r.get('partial_during_build_s', {}).get('p50'), 1e3, 1)} "
            f"| {_pair(was, now, lambda r: r.get('first_scrape_s'))} "
            f"| {_pair(was, now, lambda r: r['scrape_s']['p50'], 1e3, 1)} "
            f"| {_pair(was, now, lambda r: r['scrape_s']['p99'], 1e3, 1)} "
            f"| {_pair(was, now, lambda r: r.get('metrics_read_s'))} "
            f"| {_pair(was, now, lambda r: r.get('metrics_text_s'))} "
            f"| {_pair(was, now, lambda r: r['vmrss_kb'], 1 / 1024, 0)} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


# ---- resident memory ----------------------------------------------------------------------------------


def compose_inspect(frontend: int, replica: int) -> dict:
    """What `docker inspect` shows of replica `replica` of Compose service `frontend` (its labels as Compose and
    a typical image set them), on one bridge network."""
    k = frontend * BACKENDS_PER_FRONTEND + replica
    labels = {
        "tcp.port": str(FIRST_PORT + frontend),
        "tcp.backend_port": "80",
        "com.docker.compose.project": f"app{frontend}",
        "com.docker.compose.service": "server",
        "com.docker.compose.container-number": str(replica + 1),
        "com.docker.compose.oneoff": "False",
        "com.docker.compose.version": "2.29.7",
        "com.docker.compose.image": "sha256:" + f"{frontend:064x}",
        "com.docker.compose.config-hash": f"{frontend + 1:064x}",
        "com.docker.compose.depends_on": "",
        "com.docker.compose.project.working_dir": f"/srv/apps/app{frontend}",
        "com.docker.compose.project.config_files": f"/srv/apps/app{frontend}/compose.yml",
        "org.opencontainers.image.source": "https://github.com/example/server",
        "org.opencontainers.image.version": "1.4.2",
    }
    network = {"NetworkID": "n" * 64, "IPAddress": _address(k), "IPPrefixLen": 15, "GlobalIPv6Address": ""}
    return {
        "Id": f"{k:064x}",
        "Name": f"/app{frontend}-server-{replica + 1}",
        "Created": f"2026-01-01T00:00:{k:06d}.123456789Z",
        "Config": {"Labels": labels, "ExposedPorts": {"80/tcp": {}}},
        "State": {"Running": True, "StartedAt": "2026-01-01T01:00:00Z"},
        "NetworkSettings": {"Networks": {"bench": network}, "Ports": {"80/tcp": None}},
    }


def rss_probe(frontends: int, all_labels: bool = False) -> dict[str, int]:
    """Runs in a fresh interpreter: import the daemon's modules, then hold what the daemon holds at this size.

    The snapshots come from the engine provider's own snapshot_from_inspect, given what Docker shows of Compose
    containers; `all_labels`: keeping every label (as tcprouter did up to 9da1b48), not only those it reads."""
    from tcprouter import cli  # noqa: F401  (the daemon's imports: docker, requests, prometheus_client, tenacity)
    from tcprouter.diff import SavedRule
    from tcprouter.metrics import Metrics
    from tcprouter.policy import COMPOSE_OWNER_LABEL
    from tcprouter.providers.engine import snapshot_from_inspect

    held: list[object] = []
    if frontends:
        keys = None if all_labels else LabelKeys(owner=COMPOSE_OWNER_LABEL)
        inspects = (compose_inspect(f, r) for f in range(frontends) for r in range(BACKENDS_PER_FRONTEND))
        containers = {c.id: c for c in (snapshot_from_inspect(info, keys=keys) for info in inspects)}
        state = desired_state(containers.values())
        rules = compile_rules(state, OPTIONS)
        script = restore_script({}, rules)  # the first write's script
        applied = believed_tables(rules)
        counted = [
            (table, SavedRule(chain, spec, 1))
            for table, chains in rules.chains.items()
            for chain, specs in chains.items()
            for spec in specs
        ]
        metrics = Metrics(lambda: (applied, counted))
        metrics.state.publish(state)
        exposition = metrics.exposition(gzipped=True)  # one scrape (it waits for the first text)
        held = [containers, state, rules, applied, metrics]
        del script, exposition
    gc.collect()
    status = Path("/proc/self/status").read_text()
    field = lambda key: int(next(x for x in status.splitlines() if x.startswith(key)).split()[1])  # noqa: E731
    return {
        "frontends": frontends,
        "vmrss_kb": field("VmRSS:"),
        # VmHWM, not getrusage's maxrss: Linux carries maxrss over from the parent across fork and exec.
        "peak_kb": field("VmHWM:"),
        "objects_held": len(held),
    }


def rss_figures(sizes: list[int]) -> list[dict[str, int]]:
    rows = []
    for frontends in [0, *sizes]:
        done = subprocess.run(
            [sys.executable, "-m", "benchlib.scale", "rss", str(frontends)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        rows.append(json.loads(done.stdout))
    return rows


# ---- the listener scan done on every sync ---------------------------------------------------------------


def listener_probe(sockets: int, reads: int = 20) -> dict[str, float]:
    """Runs inside a private namespace: hold `sockets` established loopback sockets open (both ends of
    `sockets` / 2 connections), then time both
    scans of the namespace's TCP listeners: the old parse of /proc/net/tcp{,6} (every socket) and the netlink
    sock_diag request with a LISTEN state filter (hostports.host_listeners)."""
    import resource

    from tcprouter import hostports

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two descriptors per connection
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 9))
        listener.listen(4096)
        for _ in range(sockets // 2):
            stack.enter_context(socket.create_connection(("127.0.0.1", 9)))
            stack.enter_context(listener.accept()[0])
        lines = len(Path("/proc/net/tcp").read_text().splitlines()) - 1
        figures: dict[str, float] = {"sockets": sockets, "proc_net_tcp_lines": lines}
        for name, scan in (("proc", hostports.proc_listeners), ("netlink", hostports.netlink_listeners)):
            times = []
            for _ in range(reads):
                started = time.perf_counter()
                found = scan(True)
                times.append(time.perf_counter() - started)
            assert found == {9: "127.0.0.1"}, found
            figures.update({f"{name}_s_p50": median(times), f"{name}_s_max": max(times)})
    return figures


def listener_figures(counts: list[int]) -> list[dict[str, float]]:
    rows = []
    for sockets in counts:
        with contextlib.ExitStack() as stack:
            ns = netns_add(stack, "tcpr-bench-l-")
            tune_client(ns)
            done = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "benchlib.scale", "listeners", str(sockets)],
                capture_output=True,
                text=True,
                check=True,
                timeout=300,
                cwd=Path(__file__).resolve().parent.parent,
            )
            rows.append(json.loads(done.stdout))
    return rows


# ---- first-packet latency ---------------------------------------------------------------------------


class Topology:
    """client ns -- router ns (tcprouter's rules, ip_forward) -- server ns (10 addresses, port 80)."""

    def __init__(self, stack: contextlib.ExitStack, tag: str, flavour: Flavour | None = None) -> None:
        self.stack = stack
        self.client = netns_add(stack, f"tcpr-bench-{tag}c-")
        self.router = netns_add(stack, f"tcpr-bench-{tag}r-")
        self.server = netns_add(stack, f"tcpr-bench-{tag}s-")
        self.router_ip = f"{CLIENT_SUBNET}.1"
        veth(stack, self.router, self.router_ip, self.client, f"{CLIENT_SUBNET}.2", self.client[-6:])
        # One source address per measured case: conntrack keys flows by their tuple, so cases sharing a
        # source address would meet each other's entries (reopened or clashing) and disturb each other.
        self.sources = [f"{CLIENT_SUBNET}.{10 + i}" for i in range(4)]
        for ip in self.sources:
            sh("ip", "netns", "exec", self.client, "ip", "addr", "add", f"{ip}/24", "dev", f"tb{self.client[-6:]}b")
        veth(stack, self.router, f"{SERVER_NET}.1", self.server, f"{SERVER_NET}.2", self.server[-6:])
        self.server_ips = [f"{SERVER_NET}.{2 + j}" for j in range(BACKENDS_PER_FRONTEND)]
        server_if = f"tb{self.server[-6:]}b"
        for ip in self.server_ips[1:]:
            sh("ip", "netns", "exec", self.server, "ip", "addr", "add", f"{ip}/24", "dev", server_if)
        sh("ip", "netns", "exec", self.client, "ip", "route", "add", "default", "via", self.router_ip)
        sh("ip", "netns", "exec", self.server, "ip", "route", "add", "default", "via", f"{SERVER_NET}.1")
        sh("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        tune_client(self.client)
        self.iptables = Iptables(flavour or detect_flavour(), netns=self.router, timeout=120)
        self._serve()

    def _serve(self) -> None:
        """A listener on port 80 of the server namespace, in a process of its own (not a thread of this one:
        the measuring thread must not wait for the interpreter lock behind the accept loop)."""
        code = (
            "import socket\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('0.0.0.0', 80)); s.listen(4096); print('ready', flush=True)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.close()\n"
        )
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.server, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        )
        self.stack.callback(server.wait, 10)
        self.stack.callback(server.kill)
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError("the server namespace's listener did not start")

    def install(
        self,
        frontends: int,
        routed: list[int],
        first_port: int = FIRST_PORT,
        trees: Collection[Protocol] | None = None,
        nat_tables: bool = False,
    ) -> int:
        """N frontends x 10 from `first_port` on; the frontends at the `routed` indices go to the server. `trees`:
        the protocols dispatched by a tree (None: as the daemon picks; () keeps the flat dispatch). `nat_tables`:
        the dispatch and DNAT in tcprouter's nftables tables instead (--nat nftables, loaded as the daemon does)."""
        real = {f: self.server_ips for f in routed}
        state = desired_state(snapshots(frontends, real=real, first_port=first_port))
        options = dataclasses.replace(OPTIONS, nat_tables=nat_tables)
        current, _ = self.iptables.read()
        rules = compile_rules(state, options, trees)
        if nat_tables:  # imported here: the daemon probe runs this module with older tcprouters too
            from tcprouter.nftnat_netlink import NatSocket, load_batches
            from tcprouter.sync import NAT_LOAD_PARTS

            with NatSocket(self.router, timeout=120) as sock:
                sock.send_each(load_batches(state, options, NAT_LOAD_PARTS))
        self.iptables.restore(restore_script(current, rules))
        return rules.rule_count()

    def connect_times(self, address: str, port: int, count: int, source: str) -> list[float]:
        linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT piles up in the client

        def run() -> list[float]:
            times = []
            for _ in range(count):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                s.bind((source, 0))
                s.settimeout(2)
                t0 = time.perf_counter_ns()
                s.connect((address, port))
                times.append((time.perf_counter_ns() - t0) / 1e3)
                s.close()
            return times

        return in_netns(self.client, run)


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
    }


def first_packet_figures(frontends: int, samples: int) -> dict:
    cases: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        small = Topology(stack, "a")
        large = Topology(stack, "b")
        last = FIRST_PORT + frontends - 1
        rules_small = small.install(1, [0], first_port=last)  # the same port as the large set's last frontend
        rules_large = large.install(frontends, [0, frontends - 1])
        cases = {
            "no_rules_routed": [],  # straight to the server through the router: forwarding alone
            "1_frontend": [],
            f"{frontends}_frontends_first": [],
            f"{frontends}_frontends_last": [],
        }
        probes = {
            "no_rules_routed": (small, small.server_ips[0], 80),
            "1_frontend": (small, small.router_ip, last),
            f"{frontends}_frontends_first": (large, large.router_ip, FIRST_PORT),
            f"{frontends}_frontends_last": (large, large.router_ip, last),
        }
        sources = {case: (small if i < 2 else large).sources[i] for i, case in enumerate(probes)}
        for case, (topology, address, port) in probes.items():  # warm-up
            topology.connect_times(address, port, 50, sources[case])
        blocks = 10
        for _ in range(blocks):
            for case, (topology, address, port) in probes.items():
                cases[case] += topology.connect_times(address, port, samples // blocks, sources[case])
    return {
        "samples_per_case": samples,
        "rules": {"1_frontend": rules_small, f"{frontends}_frontends": rules_large},
        "connect_us": {case: _summary(values) for case, values in cases.items()},
    }


def dispatch_figures(frontends: int, samples: int, flavours: Collection[Flavour] | None = None) -> dict:
    """The first packet to the first and to the last of `frontends` x 10, with the flat dispatch (one rule per
    frontend) and with the tree of port ranges, for each flavour whose restore binary exists, and on nft with the
    nat side in tcprouter's nftables tables (64 of them: a new connection passes each table's nat hook): every
    router namespace is set up first, then the cases are measured in interleaved blocks, so that the host's noise
    spreads over all of them. The figure of merit is the ratio last / first (p50) within one layout, and the
    layouts' p50s side by side."""
    if flavours is None:
        flavours = [f for f in Flavour if shutil.which(f"iptables-{f}-restore")]
    cases: dict[str, list[float]] = {}
    probes: dict[str, tuple[Topology, int, str]] = {}
    rules: dict[str, int] = {}
    last = FIRST_PORT + frontends - 1
    with contextlib.ExitStack() as stack:
        for flavour in flavours:
            for layout, trees in _layouts(Flavour(flavour)):
                topology = Topology(stack, f"{flavour[0]}{layout[0]}", Flavour(flavour))
                started = time.perf_counter()
                rules[f"{flavour}_{layout}"] = topology.install(
                    frontends, [0, frontends - 1], trees=trees, nat_tables=layout == "nftables"
                )
                log(f"dispatch {flavour} {layout}: {frontends} x 10 installed in {time.perf_counter() - started:.1f} s")
                for i, (position, port) in enumerate((("first", FIRST_PORT), ("last", last))):
                    case = f"{flavour}_{layout}_{position}"
                    probes[case] = (topology, port, topology.sources[i])
                    cases[case] = []
        for topology, port, source in probes.values():  # warm-up
            topology.connect_times(topology.router_ip, port, 50, source)
        blocks = 10
        for _ in range(blocks):
            for case, (topology, port, source) in probes.items():
                cases[case] += topology.connect_times(topology.router_ip, port, samples // blocks, source)
    connect = {case: _summary(values) for case, values in cases.items()}
    ratios = {
        f"{flavour}_{layout}": connect[f"{flavour}_{layout}_last"]["p50"] / connect[f"{flavour}_{layout}_first"]["p50"]
        for flavour in flavours
        for layout, _ in _layouts(Flavour(flavour))
    }
    return {
        "frontends": frontends,
        "samples_per_case": samples,
        "rules": rules,
        "connect_us": connect,
        "ratio_p50": ratios,
    }


def _layouts(flavour: Flavour) -> list[tuple[str, Collection[Protocol] | None]]:
    """The dispatch layouts measured on a flavour, each with its `trees` (Topology.install)."""
    return [("flat", ()), ("tree", None), *([("nftables", ())] if flavour is Flavour.NFT else [])]


def run(sizes: list[int], repeats: int, samples: int) -> dict:
    syncs = []
    for frontends in sizes:
        figures = sync_figures(frontends, repeats)
        syncs.append(figures)
        log(
            f"scale {frontends}x{BACKENDS_PER_FRONTEND}: full sync {figures['full_sync_from_empty']['total_s']:.3f}s "
            f"({figures['rule_count']} rules), one-backend change "
            f"{figures['one_backend_change_partial']['total_s'] * 1000:.1f} ms, "
            f"{figures['one_backend_change_partial']['rules_written']:.0f} rules written"
        )
    daemon = daemon_figures(
        sizes, repeats
    )  # the daemon's own objects (old code: scripts/benchlib/scale.py daemon_figures)
    rss = rss_figures(sizes)
    log(f"scale rss: {[(r['frontends'], r['vmrss_kb']) for r in rss]}")
    first = first_packet_figures(max(sizes), samples)
    log(f"first packet: { {k: round(v['p50'], 1) for k, v in first['connect_us'].items()} } us p50")
    dispatch = dispatch_figures(DISPATCH_FRONTENDS, samples)
    log(
        f"dispatch at {DISPATCH_FRONTENDS}: last / first p50 "
        f"{ {k: round(v, 3) for k, v in dispatch['ratio_p50'].items()} }"
    )
    listeners = listener_figures([0, 1_000, 10_000])
    scans = [(r["sockets"], round(r["proc_s_p50"] * 1e3, 1), round(r["netlink_s_p50"] * 1e3, 1)) for r in listeners]
    log(f"listener scan (sockets, /proc ms, netlink ms): {scans}")
    return {
        "syncs": syncs,
        "daemon": daemon,
        "rss": rss,
        "first_packet": first,
        "dispatch": dispatch,
        "listener_scan": listeners,
    }


if __name__ == "__main__":
    if sys.argv[1] == "rss":  # rss FRONTENDS [all-labels]
        print(json.dumps(rss_probe(int(sys.argv[2]), sys.argv[3:] == ["all-labels"])))
    elif sys.argv[1] == "listeners":
        print(json.dumps(listener_probe(int(sys.argv[2]))))
    elif sys.argv[1] == "daemon":
        # daemon FRONTENDS REPEATS [nft|legacy [iptables|nftables]]: the flavour, and where the nat side lives
        flavour = Flavour(sys.argv[4]) if len(sys.argv) > 4 else None
        nat_tables = sys.argv[5:] == ["nftables"]
        print(json.dumps(daemon_probe(int(sys.argv[2]), int(sys.argv[3]), flavour, nat_tables)))
    elif sys.argv[1] == "nat":  # python -m benchlib.scale nat 10,100,1000,10000 REPEATS: iptables / nftables
        print(compare_nat_sides([int(n) for n in sys.argv[2].split(",")], int(sys.argv[3])))
    elif sys.argv[1] == "compare":  # compare OLD_CHECKOUT 10,100,1000,10000 REPEATS [nft|legacy [iptables|nftables]]
        sizes = [int(n) for n in sys.argv[3].split(",")]
        print(compare_daemons(Path(sys.argv[2]), sizes, int(sys.argv[4]), sys.argv[5:]))
    elif sys.argv[1] == "dispatch":  # alone: python -m scripts.benchlib.scale dispatch FRONTENDS SAMPLES
        print(json.dumps(dispatch_figures(int(sys.argv[2]), int(sys.argv[3]))))
