"""Control plane: how long after Docker acts does the kernel route accordingly?

One frontend with 3 steady nginx backends, tcprouter running on the host, and a fourth labelled
container that is started and killed again and again:

  start: from `docker start` returning to the first connection (from the client namespace, through the
         frontend) answered by the new container; next to it, when the container's nginx first answers
         a direct connection from the host (the floor set by the backend's own start-up).
  kill:  from `docker kill` being called to the last rule naming the container's address gone from the
         frontend's chain (polled with `iptables -t nat -S`, whose own duration bounds the resolution).

Docker's own event stream is followed too: its event timestamps split each interval into Docker's
share (call -> event) and tcprouter's share (event -> routable / rule gone).

The daemon's own histogram tcprouter_event_to_rules_seconds (Docker event timestamp to rules written)
is scraped before and after, and its increase reported.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import docker

from tests.support import join_netns

from .common import BACKEND_SUBNET, host_lock, log, summary
from .dataplane import BACKEND_PORT, ROUTER_PORT, Rig, who


def _poll_answer(address: str, port: int, hostname: str, deadline: float, pause: float = 0.0005) -> float | None:
    """The perf_counter time of the first connection answered by `hostname`; None at the deadline."""
    while time.perf_counter() < deadline:
        try:
            if who(address, port, timeout=0.5) == hostname:
                return time.perf_counter()
        except OSError:
            pass
        time.sleep(pause)
    return None


def _poll_rule_gone(tool: str, chain: str, needle: str, deadline: float) -> tuple[float | None, float]:
    """Poll the chain until no rule contains `needle`: (perf_counter time it was seen gone, longest poll)."""
    longest = 0.0
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        rules = subprocess.run([tool, "-w", "-t", "nat", "-S", chain], capture_output=True, text=True).stdout
        longest = max(longest, time.perf_counter() - started)
        if needle not in rules:
            return time.perf_counter(), longest
    return None, longest


class EventLog:
    """Docker's events for one container, with their timestamps (wall clock, ns), in a thread of its own."""

    def __init__(self, api: docker.APIClient, name: str) -> None:
        self.events: list[tuple[str, int]] = []
        self._stream = api.events(decode=True, filters={"container": name, "type": "container"})
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        with contextlib.suppress(Exception):
            for event in self._stream:
                action = (event.get("Action") or event.get("status") or "").split(":")[0]
                self.events.append((action, int(event.get("timeNano") or 0)))

    def first(self, action: str, after_ns: int) -> int | None:
        return next((t for a, t in self.events if a == action and t >= after_ns), None)

    def close(self) -> None:
        self._stream.close()


def _histogram(metrics_port: int, name: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = re.search(r'le="([^"]+)"', line).group(1)  # type: ignore[union-attr]
            values[le] = float(line.split()[-1])
        elif line.startswith((f"{name}_sum ", f"{name}_count ")):
            values[line.split()[0].removeprefix(name + "_")] = float(line.split()[1])
    return values


METRIC = "tcprouter_event_to_rules_seconds"


def _accumulate(total: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    """Add the increase of every series between two scrapes (scrapes happen between trials, when idle)."""
    for key, value in after.items():
        total[key] = total.get(key, 0.0) + value - before.get(key, 0.0)


def _histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, object]:
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    count = delta.get("count", 0.0)
    buckets = sorted(((float(k), v) for k, v in delta.items() if k not in ("sum", "count")), key=lambda kv: kv[0])

    def bound(q: float) -> float:
        """The upper bound of the bucket holding the q-quantile (what a Prometheus reader can know)."""
        for le, cumulative in buckets:
            if cumulative >= q * count:
                return le
        return float("inf")

    return {
        "count": count,
        "mean_s": delta.get("sum", 0.0) / count if count else float("nan"),
        "p50_at_most_s": bound(0.5),
        "p99_at_most_s": bound(0.99),
        "buckets": {str(le): cumulative for le, cumulative in buckets},
    }


def run(trials: int, batching: tuple[float, float] | None = None) -> dict:
    """`batching` = (max_delay, settle): run a variant of the daemon with another event-batching window."""
    api = docker.from_env(timeout=30).api
    starts: list[dict[str, float]] = []
    kills: list[dict[str, float]] = []
    failures: list[str] = []
    command = None
    if batching:
        command = [sys.executable, "-m", "benchlib.router_variant", str(batching[0]), str(batching[1])]
    what = f"control plane (batching max_delay={batching[0]}, settle={batching[1]})" if batching else "control plane"
    with host_lock(what), contextlib.ExitStack() as stack:
        rig = Rig(stack, router_command=command).up(paths=("tcprouter",))
        client = rig.clients["tcprouter"]
        name = rig.start_backend(3, ROUTER_PORT, start=False)
        ip = rig.ips[-1]
        tool = f"iptables-{rig.flavour}"
        chain = f"TCPR-FE-{ROUTER_PORT}"
        in_client = stack.enter_context(ThreadPoolExecutor(1, initializer=join_netns, initargs=(client.name,)))
        in_host = stack.enter_context(ThreadPoolExecutor(1))
        before = last_scrape = _histogram(rig.metrics_port, METRIC)
        by_phase: dict[str, dict[str, float]] = {"start": {}, "kill": {}}
        hostname = api.inspect_container(name)["Config"]["Hostname"]
        events = EventLog(api, name)
        stack.callback(events.close)
        offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)  # perf_counter -> wall clock
        marks: list[tuple[str, float, float | None]] = []  # (action, perf time of the call, perf time done)
        for trial in range(trials):
            t_call = time.perf_counter()
            api.start(name)
            t_return = time.perf_counter()
            deadline = t_return + 5
            routed = in_client.submit(_poll_answer, client.host_ip, ROUTER_PORT, hostname, deadline)
            listening = in_host.submit(_poll_answer, ip, BACKEND_PORT, hostname, deadline)
            t_routed, t_listening = routed.result(), listening.result()
            marks.append(("start", t_call, t_routed))
            if t_routed is None or t_listening is None:
                failures.append(f"trial {trial}: start not routable within 5 s")
            else:
                starts.append(
                    {
                        "call_s": t_return - t_call,
                        "routable_s": t_routed - t_return,
                        "listening_s": t_listening - t_return,
                    }
                )
            time.sleep(0.05)
            scraped = _histogram(rig.metrics_port, METRIC)
            _accumulate(by_phase["start"], last_scrape, scraped)
            last_scrape = scraped

            t_call = time.perf_counter()
            gone = in_host.submit(_poll_rule_gone, tool, chain, f"{ip}:", t_call + 5)
            api.kill(name)
            t_return = time.perf_counter()
            t_gone, resolution = gone.result()
            marks.append(("kill", t_call, t_gone))
            if t_gone is None:
                failures.append(f"trial {trial}: rule for {ip} still there 5 s after kill")
            else:
                kills.append({"call_s": t_return - t_call, "gone_s": t_gone - t_call, "poll_resolution_s": resolution})
            api.wait(name, timeout=30)
            time.sleep(0.2)  # let the die event be handled before the next start
            scraped = _histogram(rig.metrics_port, METRIC)
            _accumulate(by_phase["kill"], last_scrape, scraped)
            last_scrape = scraped
            if (trial + 1) % 10 == 0:
                log(
                    f"control plane: {trial + 1}/{trials} trials, last start->routable "
                    f"{starts[-1]['routable_s'] * 1000 if starts else float('nan'):.1f} ms, kill->gone "
                    f"{kills[-1]['gone_s'] * 1000 if kills else float('nan'):.1f} ms"
                )
        after = _histogram(rig.metrics_port, METRIC)
        time.sleep(0.5)  # the last events reach the stream
        shares: dict[str, list[dict[str, float]]] = {"start": [], "kill": []}
        for action, t_call, t_done in marks:
            call_ns = int(t_call * 1e9) + offset_ns
            event_ns = events.first(action, call_ns - 50_000_000)
            if event_ns is None or t_done is None:
                continue
            shares[action].append(
                {
                    "docker_s": (event_ns - call_ns) / 1e9,
                    "tcprouter_s": (int(t_done * 1e9) + offset_ns - event_ns) / 1e9,
                }
            )
        router_rss_kb = rig.router_rss_kb()
        router_warnings = rig.router_warnings()
    return {
        "trials": trials,
        "batching": {"max_delay_s": batching[0], "settle_s": batching[1]} if batching else "daemon default",
        "backend_subnet": f"{BACKEND_SUBNET}.0/24",
        "start": {key: summary([s[key] for s in starts]) for key in ("call_s", "routable_s", "listening_s")},
        "kill": {key: summary([k[key] for k in kills]) for key in ("call_s", "gone_s", "poll_resolution_s")},
        "start_raw": starts,
        "kill_raw": kills,
        "event_to_rules_metric": _histogram_delta(before, after),
        "event_to_rules_metric_by_trial": {phase: _histogram_delta({}, sums) for phase, sums in by_phase.items()},
        "split": {
            action: {key: summary([row[key] for row in rows]) for key in ("docker_s", "tcprouter_s")}
            for action, rows in shares.items()
            if rows
        },
        "failures": failures,
        "router_rss_kb": router_rss_kb,
        "router_warnings": router_warnings,
    }
