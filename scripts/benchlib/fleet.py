"""Fleet: real labelled containers (busybox, 100 frontends x 10 backends by default) on this host's Docker engine.

relist: the engine provider's list_labelled over a new connection, as after a reconnect: holding nothing (every
        container inspected, RELIST_WORKERS at a time) and holding the previous relist's snapshots (only what
        changed is inspected).
start:  tcprouter running on the host (a label prefix of this run's own); every container started as fast as the
        engine takes them (8 calls at a time); from the last start returning to every backend's DNAT rule in the
        kernel (polled with iptables-save, whose duration bounds the resolution).
kill:   a fifth of them killed at once (concurrently); from the last kill returning to none of their rules left.
With NAT `nftables`, tcprouter runs with `--nat nftables` and the polls read its slot maps over netlink
(nftnat_read.slot_rules, each slot as the DNAT rule iptables would hold) instead.

Usage: python -m benchlib.fleet [FRONTENDS [BACKENDS [ROUNDS [NAT]]]]   (from scripts/, as root, on a Docker host)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

from tcprouter.labels import LabelKeys
from tcprouter.model import Family
from tcprouter.netfilter import detect_flavour
from tcprouter.nftnat_read import slot_rules
from tcprouter.providers.docker_api import connect
from tcprouter.providers.engine import list_labelled

from .common import host_lock, log, median, unique

REPO = Path(__file__).resolve().parents[2]
IMAGE = "busybox:latest"
FIRST_PORT = 41000
CALLS_AT_ONCE = 8


def _start_all(api: docker.APIClient, prefix: str, frontends: int, backends: int) -> tuple[list[str], float]:
    """Create and start the containers, CALLS_AT_ONCE calls at a time: their ids, and when the last start returned."""

    def one(k: int) -> str:
        labels = {f"{prefix}.port": str(FIRST_PORT + k // backends), f"{prefix}.backend_port": "80"}
        created = api.create_container(IMAGE, ["sleep", "86400"], labels=labels, name=f"{prefix}-{k}")
        api.start(created["Id"])
        return created["Id"]

    with ThreadPoolExecutor(CALLS_AT_ONCE) as pool:
        ids = list(pool.map(one, range(frontends * backends)))
    return ids, time.perf_counter()


def _remove_all(api: docker.APIClient, prefix: str) -> None:
    found = api.containers(all=True, filters={"label": f"{prefix}.port"})
    with ThreadPoolExecutor(CALLS_AT_ONCE) as pool:
        list(pool.map(lambda c: api.remove_container(c["Id"], force=True), found))


def _addresses(api: docker.APIClient, ids: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(CALLS_AT_ONCE) as pool:
        infos = pool.map(api.inspect_container, ids)
        return {i["Id"]: next(iter(i["NetworkSettings"]["Networks"].values()))["IPAddress"] for i in infos}


def _dnat_rules(nat: str) -> Callable[[], str]:
    """What the kernel's DNAT rules read as (`-j DNAT --to-destination <address>:<port>`), on the nat side `nat`."""
    if nat == "nftables":
        return lambda: "\n".join(rule.spec for _, rule in slot_rules(Family.IPV4, None, 60))
    save = [f"iptables-{detect_flavour()}-save", "-t", "nat"]
    return lambda: subprocess.run(save, capture_output=True, text=True, check=True).stdout


def _routed(rules: Callable[[], str], addresses: set[str]) -> set[str]:
    """The addresses that some DNAT rule sends to."""
    targets = {word.rpartition(":")[0] for word in rules().split() if ":" in word and word[0].isdigit()}
    return addresses & targets


def _poll(rules: Callable[[], str], addresses: set[str], until, deadline: float) -> tuple[float | None, float]:
    """Poll the DNAT rules until `until(routed addresses)`: (when it first held, longest poll)."""
    longest = 0.0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        done = until(_routed(rules, addresses))
        longest = max(longest, time.perf_counter() - started)
        if done:
            return time.perf_counter(), longest
        time.sleep(0.05)
    return None, longest


def relist_figures(prefix: str, rounds: int) -> dict[str, float]:
    fresh, held_times, inspected = [], [], []
    held: dict = {}
    for _ in range(rounds):
        for holding in (False, True):
            api = connect(None, timeout=60)  # a new connection, as after a reconnect
            counted = _Counting(api)
            started = time.perf_counter()
            found = list_labelled(counted, LabelKeys(prefix), held=held if holding else None)
            took = time.perf_counter() - started
            (held_times if holding else fresh).append(took)
            if holding:
                inspected.append(counted.inspects)
            held = {s.id: s for s in found}
            api.close()
    return {
        "containers": len(held),
        "relist_inspect_all_s": median(fresh),
        "relist_holding_s": median(held_times),
        "inspects_when_holding": max(inspected),
    }


class _Counting:
    def __init__(self, api: docker.APIClient) -> None:
        self.api, self.inspects = api, 0

    def __getattr__(self, name: str):
        return getattr(self.api, name)

    def inspect_container(self, container_id: str) -> dict:
        self.inspects += 1
        return self.api.inspect_container(container_id)


def run(frontends: int = 100, backends: int = 10, rounds: int = 3, nat: str = "iptables") -> dict:
    prefix = unique("fleet")
    api = connect(None, timeout=120)
    save = _dnat_rules(nat)
    figures: dict = {"frontends": frontends, "backends_per_frontend": backends, "nat": nat}
    with contextlib.ExitStack() as stack:
        stack.callback(_remove_all, api, prefix)
        stack.enter_context(host_lock("fleet"))
        tool = [sys.executable, "-m", "tcprouter"]
        stack.callback(subprocess.run, [*tool, "cleanup"], cwd=REPO, capture_output=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics = s.getsockname()[1]
        router_log = Path(tempfile.mkstemp(prefix="tcpr-fleet-", suffix=".log")[1])
        stack.callback(router_log.unlink, missing_ok=True)
        router = subprocess.Popen(
            [*tool, "run", "--label-prefix", prefix, "--metrics-address", f"127.0.0.1:{metrics}", "--nat", nat],
            stdout=router_log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ),
        )  # fmt: skip
        stack.callback(router.wait, 30)
        stack.callback(router.terminate)
        began = time.perf_counter()
        ids, last_start = _start_all(api, prefix, frontends, backends)
        figures["start_all_s"] = last_start - began
        log(f"fleet: {len(ids)} containers started in {figures['start_all_s']:.1f}s")
        addresses = _addresses(api, ids)
        everyone = set(addresses.values())
        routed, longest = _poll(save, everyone, lambda seen: seen == everyone, time.perf_counter() + 120)
        if router.poll() is not None:
            raise RuntimeError(f"tcprouter exited: {router_log.read_text()[-2000:]}")
        figures["routable_after_last_start_s"] = None if routed is None else routed - last_start
        figures["start_poll_longest_s"] = longest
        log(f"fleet: all routable {figures['routable_after_last_start_s']}s after the last start")
        figures.update(relist_figures(prefix, rounds))
        log(f"fleet: relist {figures}")
        victims = ids[:: max(1, len(ids) // (len(ids) // 5))][: len(ids) // 5]
        gone = {addresses[v] for v in victims}
        kill_began = time.perf_counter()
        with ThreadPoolExecutor(len(victims)) as pool:
            list(pool.map(api.kill, victims))
        last_kill = time.perf_counter()
        out, longest = _poll(save, gone, lambda seen: not seen, time.perf_counter() + 60)
        figures["killed"] = len(victims)
        figures["kill_calls_s"] = last_kill - kill_began
        figures["out_after_last_kill_s"] = None if out is None else out - last_kill
        figures["kill_poll_longest_s"] = longest
        log(f"fleet: {len(victims)} killed, out {figures['out_after_last_kill_s']}s after the last kill returned")
    return figures


if __name__ == "__main__":
    numbers = [int(a) for a in sys.argv[1:4]]
    print(json.dumps(run(*numbers, *sys.argv[4:5]), indent=1))
