"""Gateway mode: this host in front of a 3-node Swarm, `tcprouter run --swarm` against HAProxy and direct access.

A lab of tests/cluster.py (3 Docker engines in network namespaces on a host bridge, one Swarm, node 1 the
manager) on 198.18.97.0/24, the bench nginx image loaded into every node:

    client netns (203.0.113.16i+2) --veth-- host (203.0.113.16i+1 | 198.18.97.1) --bridge-- node i (198.18.97.1i)
                                                                                          nginx task, host-mode port

  direct     client -> host routing -> node 2's address:published port (the host only forwards; the node's own
             Docker DNAT to its container, as on every path)
  tcprouter  client -> host:8501, DNAT by `tcprouter run --swarm` (round-robin over the 3 tasks) + MASQUERADE
  haproxy    client -> host:8503, HAProxy in TCP mode on the host, round-robin over the same 3 node:port endpoints
             (from a source address of its own on the lab bridge, 198.18.97.2: see HAPROXY_SOURCE)
  direct-3   no proxy: wrk thread i connects straight to node i's task (what spreading over 3 nodes costs alone)

Then, with the gateway running, a second service (frontend 8502) is scaled 1 -> 2 -> 1 again and again: how long
from a new task's `running` timestamp (the manager's) to its DNAT rule in the host's kernel and to the first
connection through the gateway answered by it, and from a leaving task's desired-state change to its rule gone.

The lab and its services are built before the host lock is taken (the lab holds its own subnet lock); each figure
and the trials then hold the host lock with their own tcprouter, HAProxy, client namespaces and forwarding rules.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from tcprouter.metrics import backend_connections
from tcprouter.model import timestamp_ns
from tcprouter.netfilter import Iptables, detect_flavour
from tests.cluster import DockerLab, node_addresses, scale_service
from tests.support import BACKEND_IMAGE, in_netns, join_netns

from .common import LABEL_PREFIX, NGINX_IMAGE, REPO, ClientHost, host_lock, log, sh, summary, unique
from .controlplane import METRIC, _histogram, _histogram_delta
from .dataplane import (
    FIGURES,
    _conntrack_count,
    _conntrack_drops,
    _conntrack_stats,
    _cpu_busy,
    _cpu_times,
    _medians,
    _proc_cpu,
    _stop,
    _syn_retransmits,
    latency_probe,
    log_problems,
    probe_samples,
    rss_kb,
    run_wrk,
    wait_for,
    who,
    wrk_command,
    wrk_result,
)

SUBNET = "198.18.97"  # the e2e tests' labs use .99 and .98
NGINX_PORT = 80
FRONT_PORT = 8501  # tcprouter's frontend for the data plane service
TRIAL_PORT = 8502  # tcprouter's frontend for the service scaled up and down
HAPROXY_PORT = 8503
# HAProxy's own source address towards the nodes, apart from the gateway's masquerading address (.1): the tasks keep
# TIME_WAIT sockets for 60 s, keyed by source address and port. Had HAProxy's connections (the host's TCP timestamps)
# and the masqueraded ones (the client's timestamps, another clock offset) the same source address, a masqueraded SYN
# reusing a port of HAProxy's would be refused by PAWS and retried after 1 s. The host's conntrack would normally
# prevent that (MASQUERADE skips ports in use, TIME_WAIT entries last 120 s), but the benchmark empties it between runs.
HAPROXY_SOURCE = f"{SUBNET}.2"
PATHS = ("direct", "tcprouter", "haproxy", "direct-3")
DIRECT_NODE = 2  # a worker: the manager (node 1) also runs the Raft store and the orchestrator
TERMINAL = {"shutdown", "complete", "failed", "rejected", "orphaned", "remove"}


def timestamp_s(text: str) -> float:
    """A Docker timestamp as seconds since the epoch; nan if unreadable (never a bogus 0 in a latency)."""
    return timestamp_ns(text) / 1e9 or float("nan")


def docker_flavour() -> str:
    """Docker's iptables flavour, waiting (up to 60 s) while the host's dockerd restarts: until it has recreated its
    chains, detect_flavour() falls back to another flavour, where DOCKER-USER does not exist."""

    def found() -> str | None:
        flavour = str(detect_flavour())
        listed = subprocess.run([f"iptables-{flavour}", "-w", "-S", "DOCKER-USER"], capture_output=True, check=False)
        return flavour if listed.returncode == 0 else None

    return wait_for(found, 60, "Docker's DOCKER-USER chain", interval=0.5)


# ---- the lab's services ---------------------------------------------------------------------------------------


def create_nginx_service(lab: DockerLab, name: str, replicas: int, port: int, one_per_node: bool) -> None:
    """A service of bench nginx tasks labelled for frontend `port`, publishing 80 in host mode (a port Swarm picks
    on each node)."""
    lab.docker(
        1, "service", "create", "--no-resolve-image", "--detach", "--name", name,
        "--label", f"{LABEL_PREFIX}.port={port}", "--publish", f"mode=host,target={NGINX_PORT}",
        "--replicas", str(replicas), *(["--replicas-max-per-node", "1"] if one_per_node else []),
        "--stop-grace-period", "5s", NGINX_IMAGE,
    )  # fmt: skip


class Tasks:
    """The manager's view of a service's tasks (desired state running), with each node's address."""

    def __init__(self, lab: DockerLab) -> None:
        self.lab = lab
        self.addresses = node_addresses(lab)  # node ID -> address; the lab's nodes do not change
        self.node_index = {lab.node_address(i): i for i in range(1, lab.nodes + 1)}

    def of(self, service: str) -> list[dict]:
        found = []
        for task in self.lab.api(1).tasks(filters={"service": service, "desired-state": "running"}):
            status = task["Status"]
            ports = (status.get("PortStatus") or {}).get("Ports") or []
            published = [p["PublishedPort"] for p in ports if p.get("TargetPort") == NGINX_PORT]
            address = self.addresses.get(task.get("NodeID", ""), "")
            found.append(
                {
                    "id": task["ID"],
                    "node": self.node_index.get(address, 0),
                    "address": address,
                    "port": published[0] if published else None,
                    "state": status["State"],
                    "timestamp": status.get("Timestamp", ""),
                    "container_id": (status.get("ContainerStatus") or {}).get("ContainerID"),
                }
            )
        return sorted(found, key=lambda t: t["node"])

    def running(self, service: str, count: int, timeout: float = 120) -> list[dict]:
        """Exactly `count` tasks, all running with their port published and nginx answering from the host."""

        def ready() -> list[dict] | None:
            tasks = self.of(service)
            if len(tasks) != count or any(t["state"] != "running" or t["port"] is None for t in tasks):
                return None
            for t in tasks:
                t["hostname"] = who(t["address"], t["port"])
            return tasks

        return wait_for(ready, timeout, f"{count} running tasks of {service}", interval=0.2)

    def hostname(self, task: dict) -> str:
        """The container's host name: what nginx answers on /who."""
        return self.lab.api(task["node"]).inspect_container(task["container_id"])["Config"]["Hostname"]


# ---- the rig: client namespaces, forwarding rules, HAProxy, tcprouter ---------------------------------------


class GatewayRig:
    """Everything one locked part needs besides the lab; all removed on exit from `stack`."""

    def __init__(
        self, stack: contextlib.ExitStack, lab: DockerLab, web: list[dict], router_args: tuple[str, ...] = ()
    ) -> None:
        self.stack = stack
        self.lab = lab
        self.web = web  # the 3 tasks of the data plane's service, one per node, sorted by node
        self.flavour = docker_flavour()
        self.iptables = Iptables(self.flavour)  # type: ignore[arg-type]
        self.router_args = router_args
        self.clients: dict[str, ClientHost] = {}
        self.router: subprocess.Popen | None = None
        self.haproxy: subprocess.Popen | None = None
        self.metrics_port = 0
        self.router_log = Path()
        self._task_pids: list[int] = []

    @property
    def direct(self) -> dict:
        return next(t for t in self.web if t["node"] == DIRECT_NODE)

    def up(self, paths: tuple[str, ...]) -> GatewayRig:
        self._tcprouter("cleanup")  # rules left by a run that was killed
        self.clients = {path: ClientHost.create(self.stack, i) for i, path in enumerate(paths)}
        for path in paths:
            if path.startswith("direct"):
                self._direct_rules(path)
        if "haproxy" in paths:
            self._start_haproxy()
        self._start_router()
        if "tcprouter" in paths:
            want = {t["hostname"] for t in self.web}
            wait_for(
                lambda: want <= set(self.client_whos("tcprouter", 6)) or self.router.poll() is not None,  # type: ignore[union-attr]
                30,
                "tcprouter routing to the 3 tasks",
            )
            self._check_router()
        for path in paths:
            if path != "tcprouter":
                got = set(self.client_whos(path, 3))
                if not got:
                    raise RuntimeError(f"{path}: no answer from the client namespace")
        return self

    def endpoints(self, path: str) -> list[dict]:
        return [self.direct] if path == "direct" else self.web

    def _direct_rules(self, path: str) -> None:
        """Let the client reach the nodes' published ports through the host's FORWARD chain (policy DROP, Docker's):
        at the top of DOCKER-USER, an ACCEPT for state NEW (its packet counter counts the connections), one for the
        client's established packets and one for the replies. No Docker rule accepts the lab bridge's traffic."""
        tool = f"iptables-{self.flavour}"
        client = self.clients[path].client_ip
        for task in self.endpoints(path):
            node, port = f"{task['address']}/32", str(task["port"])
            comment = ["-m", "comment", "--comment", f"tcpr-bench-gw-{path}"]
            specs = [
                ["-s", f"{client}/32", "-d", node, "-p", "tcp", "--dport", port, "-m", "conntrack", "--ctstate", "NEW"],
                ["-s", f"{client}/32", "-d", node, "-p", "tcp", "--dport", port, "-m", "conntrack", "--ctstate",
                 "ESTABLISHED"],
                ["-s", node, "-d", f"{client}/32", "-p", "tcp", "--sport", port, "-m", "conntrack", "--ctstate",
                 "ESTABLISHED"],
            ]  # fmt: skip
            for spec in specs:
                rule = [*spec, *comment, "-j", "ACCEPT"]
                sh(tool, "-w", "-I", "DOCKER-USER", "1", *rule)
                self.stack.callback(sh, tool, "-w", "-D", "DOCKER-USER", *rule, check=False)

    def _start_haproxy(self) -> None:
        servers = "\n".join(f"    server n{t['node']} {t['address']}:{t['port']}" for t in self.web)
        config = f"""global
    maxconn 9000
    nbthread {os.cpu_count() or 1}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend gateway
    bind {self.clients["haproxy"].host_ip}:{HAPROXY_PORT}
    default_backend swarm
backend swarm
    balance roundrobin
    source {HAPROXY_SOURCE}
{servers}
"""
        sh("ip", "addr", "add", f"{HAPROXY_SOURCE}/32", "dev", self.lab.bridge)
        self.stack.callback(sh, "ip", "addr", "del", f"{HAPROXY_SOURCE}/32", "dev", self.lab.bridge, check=False)
        directory = Path(tempfile.mkdtemp(prefix="tcpr-bench-gw-haproxy-"))
        self.stack.callback(sh, "rm", "-rf", str(directory), check=False)
        (directory / "haproxy.cfg").write_text(config)
        out = (directory / "haproxy.log").open("w")
        self.stack.callback(out.close)
        self.haproxy = subprocess.Popen(
            ["haproxy", "-f", str(directory / "haproxy.cfg"), "-db"], stdout=out, stderr=subprocess.STDOUT
        )
        self.stack.callback(_stop, self.haproxy)
        client = self.clients["haproxy"]
        wait_for(lambda: in_netns(client.name, lambda: who(client.host_ip, HAPROXY_PORT)), 10, "HAProxy")

    def _start_router(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]
        self.router_log = Path(tempfile.mkstemp(prefix="tcpr-bench-gw-router-", suffix=".log")[1])
        self.stack.callback(self.router_log.unlink, missing_ok=True)
        self.stack.callback(self._tcprouter, "cleanup")
        out = self.router_log.open("w")
        self.stack.callback(out.close)
        self.router = subprocess.Popen(
            [
                sys.executable, "-m", "tcprouter", "run", "--swarm", "--docker-url", self.lab.manager_url,
                "--label-prefix", LABEL_PREFIX, "--flavour", self.flavour,
                "--metrics-address", f"127.0.0.1:{self.metrics_port}", *self.router_args,
            ],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        self.stack.callback(_stop, self.router)
        wait_for(lambda: self._synced() or self.router.poll() is not None, 30, "tcprouter's first sync")  # type: ignore[union-attr]
        self._check_router()

    def _synced(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
        return any(
            line.startswith("tcprouter_last_sync_timestamp_seconds ") and float(line.split()[1]) > 0
            for line in text.splitlines()
        )

    def _check_router(self) -> None:
        if self.router is not None and self.router.poll() is not None:
            raise RuntimeError(f"tcprouter exited: {self.router_log.read_text()[-3000:]}")

    def _tcprouter(self, *args: str) -> None:
        sh(sys.executable, "-m", "tcprouter", *args, "--label-prefix", LABEL_PREFIX, check=False)

    def url(self, path: str) -> tuple[str, int]:
        if path == "tcprouter":
            return self.clients[path].host_ip, FRONT_PORT
        if path == "haproxy":
            return self.clients[path].host_ip, HAPROXY_PORT
        task = self.endpoints(path)[0]
        return task["address"], task["port"]

    def client_whos(self, path: str, count: int, port: int | None = None) -> list[str]:
        address, default_port = self.url(path)

        def ask() -> list[str]:
            answers = []
            for _ in range(count):
                with contextlib.suppress(OSError):
                    answers.append(who(address, port or default_port))
            return answers

        return in_netns(self.clients[path].name, ask)

    # ---- measuring ------------------------------------------------------------------------------------------

    def new_connection_counters(self) -> dict[str, int]:
        _, counted = self.iptables.read(counters=True)
        counts = {}
        if "tcprouter" in self.clients:
            counts["tcprouter"] = sum(n for (p, _), n in backend_connections(counted).items() if p == str(FRONT_PORT))
        for path in self.clients:
            if path.startswith("direct"):
                needle = f"--comment tcpr-bench-gw-{path} "
                counts[path] = sum(
                    r.packets for _, r in counted if r.chain == "DOCKER-USER" and needle in r.spec and "NEW" in r.spec
                )
        return counts

    def node_conntrack(self) -> dict[str, int]:
        """drop + insert_failed + early_drop of the nodes' own conntrack tables (each node DNATs to its task)."""
        total = {"drop": 0, "insert_failed": 0, "early_drop": 0}
        for i in range(1, self.lab.nodes + 1):
            lines = sh("ip", "netns", "exec", self.lab.node_ns(i), "cat", "/proc/net/stat/nf_conntrack").splitlines()
            names = lines[0].split()
            for line in lines[1:]:
                for name, value in zip(names, line.split(), strict=False):
                    if name in total:
                        total[name] += int(value, 16)
        return total

    def task_tcp_counters(self) -> dict[str, int]:
        """The TcpExt counters of the 3 tasks' own network namespaces, summed (/proc/PID/net/netstat): SYNs refused
        by PAWS against a TIME_WAIT socket (PAWSTimewait), accept-queue overflows (ListenOverflows)..."""
        if not self._task_pids:
            self._task_pids = [
                self.lab.api(t["node"]).inspect_container(t["container_id"])["State"]["Pid"] for t in self.web
            ]
        total: dict[str, int] = {}
        for pid in self._task_pids:
            text = Path(f"/proc/{pid}/net/netstat").read_text()
            names, values = [x.split()[1:] for x in text.splitlines() if x.startswith("TcpExt:")][:2]
            for name, value in zip(names, values, strict=True):
                total[name] = total.get(name, 0) + int(value)
        return total

    def forget_connections(self) -> None:
        """Delete the conntrack entries of our flows only: our clients' (host), HAProxy's and the prober's to the
        tasks (host), and those of the tasks' published ports in each node's own table."""
        run = lambda *a: subprocess.run(a, capture_output=True, check=False, timeout=120)  # noqa: E731
        for client in self.clients.values():
            run("conntrack", "-D", "-s", client.client_ip)
        for task in self.web:
            port = str(task["port"])
            for source in (self.lab.host_address, HAPROXY_SOURCE):
                run("conntrack", "-D", "-s", source, "-d", task["address"], "-p", "tcp", "--dport", port)
            run("ip", "netns", "exec", self.lab.node_ns(task["node"]), "conntrack", "-D", "-p", "tcp", "--dport", port)

    def wrk(self, path: str, duration: float, connections: int, close: bool, resource: str = "/") -> dict:
        address, port = self.url(path)
        targets = ",".join(f"{t['address']}:{t['port']}" for t in self.web) if path == "direct-3" else ""
        command = wrk_command(self.clients[path].name, address, port, targets, duration, connections, close, resource)
        self.forget_connections()
        procs = (("haproxy", self.haproxy), ("tcprouter", self.router))
        before_syn = _syn_retransmits(self.clients[path].name)
        before_stats, before_drops, before_nodes = _conntrack_stats(), _conntrack_drops(), self.node_conntrack()
        before_tasks = self.task_tcp_counters()
        before_counters = self.new_connection_counters()
        before_cpu = _cpu_times()
        before_proc = {name: _proc_cpu(p) for name, p in procs}
        done = run_wrk(command, path, duration)
        cpu = _cpu_busy(before_cpu, _cpu_times())
        proc = {name: _proc_cpu(p) - before_proc[name] for name, p in procs}
        after_counters = self.new_connection_counters()
        after_stats, after_nodes, after_tasks = _conntrack_stats(), self.node_conntrack(), self.task_tcp_counters()
        result = wrk_result(done)
        result["cpu_busy_fraction"] = cpu
        result["proxy_cpu_s"] = proc["haproxy"] if path == "haproxy" else 0.0
        result["router_cpu_s"] = proc["tcprouter"]
        result["conntrack_drops"] = _conntrack_drops() - before_drops
        result["conntrack_entries_after"] = _conntrack_count()
        result["syn_retransmits"] = _syn_retransmits(self.clients[path].name) - before_syn
        result["conntrack_stats"] = {k: after_stats[k] - before_stats.get(k, 0) for k in after_stats}
        result["node_conntrack"] = {k: after_nodes[k] - before_nodes[k] for k in after_nodes}
        result["task_tcp"] = {
            k: v - before_tasks.get(k, 0) for k, v in after_tasks.items() if v - before_tasks.get(k, 0)
        }
        if path in after_counters:
            result["new_connections_counted"] = after_counters[path] - before_counters[path]
        return result

    def probe(self, path: str, count: int) -> dict[str, list[float]]:
        return latency_probe(self.clients[path].name, *self.url(path), count)

    def router_warnings(self) -> list[str]:
        return log_problems(self.router_log)

    def router_rss_kb(self) -> int:
        return rss_kb(self.router)


def _brief(tcp: dict[str, int]) -> dict[str, int]:
    keys = ("PAWSTimewait", "PAWSEstab", "ListenOverflows", "ListenDrops", "TCPTimeWaitOverflow", "TW")
    return {k: tcp[k] for k in keys if tcp.get(k)}


# ---- data plane ---------------------------------------------------------------------------------------------


def run_figure(
    lab: DockerLab,
    web: list[dict],
    figure: str,
    rounds: int,
    duration: float,
    probes: int,
    router_args: tuple[str, ...] = (),
) -> dict:
    connections, close, resource, what = FIGURES[figure]
    runs: dict[str, list[dict]] = {p: [] for p in PATHS}
    extra: dict[str, object] = {}
    with host_lock(f"gateway: {figure}"), contextlib.ExitStack() as stack:
        rig = GatewayRig(stack, lab, web, router_args).up(PATHS)
        for path in PATHS:  # warm-up: ARP, conntrack, nginx workers
            rig.wrk(path, 1, connections, close, resource)
        for r in range(rounds):
            order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]
            for path in order:
                result = rig.wrk(path, duration, connections, close, resource)
                runs[path].append(result)
                rig._check_router()
                log(
                    f"gateway {figure} round {r + 1}/{rounds} {path:<9} {result['rps']:>9.0f} req/s "
                    f"p50 {result['lat_p50_us']}us p99 {result['lat_p99_us']}us err {result['errors']} "
                    f"counted {result.get('new_connections_counted', '-')} cpu {result['cpu_busy_fraction']} "
                    f"router cpu {result['router_cpu_s']:.2f}s drops {result['conntrack_drops']} "
                    f"nodes {result['node_conntrack']} tasks {_brief(result['task_tcp'])} "
                    f"SYN retransmits {result['syn_retransmits']}"
                )
        if probes:
            extra["probe"] = probe_samples(rig, PATHS, probes)
        extra["router_rss_kb"] = rig.router_rss_kb()
        extra["router_warnings"] = rig.router_warnings()
        rig.forget_connections()
    return {"figure": figure, "what": what, "duration_s": duration, "rounds": rounds, "runs": runs, **extra,
            "median": _medians(runs)}  # fmt: skip


# ---- task running -> routable -----------------------------------------------------------------------------


class RulePoller:
    """Lists the frontend's chain in the host's kernel in a loop: (start, end, DNAT targets) per poll, wall clock."""

    def __init__(self, flavour: str, port: int, pause: float = 0.01) -> None:
        self.command = [f"iptables-{flavour}", "-w", "-t", "nat", "-S", f"TCPR-FE-{port}"]
        self.pause = pause
        self.polls: list[tuple[float, float, frozenset[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            text = subprocess.run(self.command, capture_output=True, text=True, check=False).stdout
            self.polls.append((started, time.time(), frozenset(re.findall(r"--to-destination (\S+)", text))))
            self._stop.wait(self.pause)

    def start(self) -> RulePoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def first(self, after: float, present: bool, target: str) -> tuple[float, float] | None:
        """The first poll started after `after` that saw `target` present (or absent): (its end, its duration)."""
        for started, ended, targets in list(self.polls):
            if started >= after and (target in targets) == present:
                return ended, ended - started
        return None


class AnswerPoller:
    """New connections through the gateway from the client namespace in a loop: (time answered, hostname, error)."""

    def __init__(self, ns: str, address: str, port: int, pause: float = 0.002) -> None:
        self.ns, self.address, self.port, self.pause = ns, address, port, pause
        self.answers: list[tuple[float, str | None, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        join_netns(self.ns)
        while not self._stop.is_set():
            try:
                name = who(self.address, self.port, timeout=1.0)
                self.answers.append((time.time(), name, None))
            except OSError as error:
                self.answers.append((time.time(), None, type(error).__name__))
            self._stop.wait(self.pause)

    def start(self) -> AnswerPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def first(self, after: float, hostname: str) -> float | None:
        return next((t for t, name, _ in list(self.answers) if t >= after and name == hostname), None)

    def failures(self, start: float, end: float) -> int:
        return sum(1 for t, _, error in list(self.answers) if error and start <= t <= end)

    def count(self, start: float, end: float) -> int:
        return sum(1 for t, _, _ in list(self.answers) if start <= t <= end)


def _join(lab: DockerLab, tasks: Tasks, service: str, rules: RulePoller, answers: AnswerPoller) -> dict:
    """Scale 1 -> 2; the new task's running timestamp, its rule's first sighting, its first answer."""
    before = {t["id"] for t in tasks.of(service)}
    t_call = time.time()
    scale_service(lab, service, 2)
    t_return = time.time()

    def new_running() -> dict | None:
        listed = tasks.of(service)
        found = next((t for t in listed if t["id"] not in before and t["state"] == "running" and t["port"]), None)
        if found:
            found["seen_at"] = time.time()  # when the manager's listing first showed it running (polled every 20 ms)
        return found

    new = wait_for(new_running, 60, "the new task running", interval=0.02)
    running = timestamp_s(new["timestamp"])
    target, hostname = f"{new['address']}:{new['port']}", tasks.hostname(new)
    seen = wait_for(lambda: rules.first(t_call, True, target), 15, f"the DNAT rule to {target}")
    answered = wait_for(lambda: answers.first(t_call, hostname), 15, f"{hostname} answering through the gateway")
    return {
        "scale_call_s": t_return - t_call,
        "call_to_running_s": running - t_call,
        "running_to_listed_s": new["seen_at"] - running,
        "running_to_rule_s": seen[0] - running,
        "running_to_answered_s": answered - running,
        "rule_poll_s": seen[1],
        "node": new["node"],
        "target": target,
    }


def _leave(lab: DockerLab, tasks: Tasks, service: str, rules: RulePoller, answers: AnswerPoller) -> dict:
    """Scale 2 -> 1 (Swarm picks the task); when its desired state changed, when its rule was gone, and how many
    connections through the gateway failed meanwhile."""
    listed = {t["id"]: t for t in tasks.of(service)}
    t_call = time.time()
    scale_service(lab, service, 1)
    t_return = time.time()

    def one_left() -> tuple[str, float] | None:
        now = {t["id"] for t in tasks.of(service)}
        return (next(iter(listed.keys() - now)), time.time()) if len(now) == 1 else None

    left_id, seen_at = wait_for(one_left, 30, "one task leaving", interval=0.01)
    inspected = lab.api(1).inspect_task(left_id)
    left = listed[left_id]
    target = f"{left['address']}:{left['port']}"
    gone = wait_for(lambda: rules.first(t_call, False, target), 15, f"the rule to {target} gone")
    state = (inspected.get("Status") or {}).get("State", "")
    updated = timestamp_s(inspected.get("UpdatedAt", ""))
    # UpdatedAt is the desired-state change only while the task still reports `running` (its next status report
    # moves UpdatedAt on): kept only then
    row = {
        "scale_call_s": t_return - t_call,
        "call_to_rule_gone_s": gone[0] - t_call,
        "desired_to_rule_gone_s": gone[0] - updated if state == "running" else None,
        "call_to_desired_s": updated - t_call if state == "running" else None,
        "left_listing_seen_s": seen_at - t_call,
        "desired_state": inspected.get("DesiredState"),
        "state_when_seen": state,
        "rule_poll_s": gone[1],
        "target": target,
    }
    with contextlib.suppress(RuntimeError):  # let the leaving task finish before the next trial
        wait_for(
            lambda: (lab.api(1).inspect_task(left_id).get("Status") or {}).get("State") in TERMINAL,
            30,
            "the leaving task stopped",
            interval=0.1,
        )
    time.sleep(max(0.0, gone[0] + 1.0 - time.time()))
    row["connections"] = answers.count(t_call, gone[0] + 1.0)
    row["failed_connections"] = answers.failures(t_call, gone[0] + 1.0)
    return row


def run_trials(lab: DockerLab, web: list[dict], service: str, trials: int, router_args: tuple[str, ...] = ()) -> dict:
    tasks = Tasks(lab)
    joins: list[dict] = []
    leaves: list[dict] = []
    failures: list[str] = []
    with host_lock("gateway: scale trials"), contextlib.ExitStack() as stack:
        rig = GatewayRig(stack, lab, web, router_args).up(("tcprouter",))
        client = rig.clients["tcprouter"]
        [base] = tasks.running(service, 1)
        wait_for(lambda: base["hostname"] in rig.client_whos("tcprouter", 2, TRIAL_PORT), 30, "the trial frontend")
        rules = RulePoller(rig.flavour, TRIAL_PORT).start()
        stack.callback(rules.stop)
        answers = AnswerPoller(client.name, client.host_ip, TRIAL_PORT).start()
        stack.callback(answers.stop)
        metric_before = _histogram(rig.metrics_port, METRIC)
        cpu_before, wall_before = _proc_cpu(rig.router), time.monotonic()
        for trial in range(trials):
            rig._check_router()
            try:
                joins.append(_join(lab, tasks, service, rules, answers))
                time.sleep(0.3)  # both tasks in the rotation for a moment
                leaves.append(_leave(lab, tasks, service, rules, answers))
            except RuntimeError as error:  # a timeout: note it, start the next trial from one task again
                failures.append(f"trial {trial}: {error}")
                log(f"gateway trial {trial} failed: {error}")
                scale_service(lab, service, 1)
                tasks.running(service, 1)
                continue
            if (trial + 1) % 5 == 0 or trial == 0:
                j, lv = joins[-1], leaves[-1]
                log(
                    f"gateway trials {trial + 1}/{trials}: running -> rule {j['running_to_rule_s'] * 1000:.0f} ms, "
                    f"-> answered {j['running_to_answered_s'] * 1000:.0f} ms; scale-down call -> rule gone "
                    f"{lv['call_to_rule_gone_s'] * 1000:.0f} ms, {lv['failed_connections']} failed of "
                    f"{lv['connections']} connections"
                )
        router_cpu = {"cpu_s": _proc_cpu(rig.router) - cpu_before, "wall_s": time.monotonic() - wall_before}
        metric_after = _histogram(rig.metrics_port, METRIC)
        rule_polls = [end - start for start, end, _ in rules.polls]
        router_warnings = rig.router_warnings()
        router_rss_kb = rig.router_rss_kb()
        rig.forget_connections()

    def stats(rows: list[dict], key: str) -> dict[str, float]:
        return summary([row[key] for row in rows if row.get(key) is not None])

    join_keys = (
        "scale_call_s",
        "call_to_running_s",
        "running_to_listed_s",
        "running_to_rule_s",
        "running_to_answered_s",
        "rule_poll_s",
    )
    leave_keys = (
        "scale_call_s",
        "call_to_desired_s",
        "desired_to_rule_gone_s",
        "call_to_rule_gone_s",
        "left_listing_seen_s",
        "rule_poll_s",
    )
    return {
        "trials": trials,
        "router_args": list(router_args),
        "join": {k: stats(joins, k) for k in join_keys},
        "leave": {k: stats(leaves, k) for k in leave_keys},
        "leave_failed_connections": sum(lv["failed_connections"] for lv in leaves),
        "leave_connections": sum(lv["connections"] for lv in leaves),
        "leave_trials_with_failures": sum(1 for lv in leaves if lv["failed_connections"]),
        "rule_poll_s": summary(rule_polls),
        "join_raw": joins,
        "leave_raw": leaves,
        "event_to_rules_metric": _histogram_delta(metric_before, metric_after),
        "failures": failures,
        "router_warnings": router_warnings,
        "router_rss_kb": router_rss_kb,
        "router_cpu": router_cpu,
    }


# ---- the phase -------------------------------------------------------------------------------------------------


def run(
    rounds: int,
    duration: float,
    probes: int,
    trials: int,
    figures: list[str],
    router_args: tuple[str, ...] = (),
) -> dict:
    if not sh("docker", "images", "-q", BACKEND_IMAGE).strip():
        raise RuntimeError(
            f"{BACKEND_IMAGE} is missing (the lab loads it into every node): run scripts/setup-test-host"
        )
    result: dict = {
        "subnet": f"{SUBNET}.0/24",
        "nodes": 3,
        "paths": list(PATHS),
        "direct_node": DIRECT_NODE,
        "router_args": list(router_args),
    }
    with contextlib.ExitStack() as outer:
        started = time.monotonic()
        log(f"gateway: creating a 3-node Swarm lab on {SUBNET}.0/24 and loading {NGINX_IMAGE} into it")
        lab = DockerLab(nodes=3, swarm=True, subnet=SUBNET, images=[NGINX_IMAGE])
        outer.callback(lab.destroy)  # registered first: destroy() also undoes a partial create()
        lab.create()
        web, trial = unique("gwweb"), unique("gwtrial")
        create_nginx_service(lab, web, 3, FRONT_PORT, one_per_node=True)
        create_nginx_service(lab, trial, 1, TRIAL_PORT, one_per_node=False)
        tasks = Tasks(lab)
        web_tasks = tasks.running(web, 3)
        if sorted(t["node"] for t in web_tasks) != [1, 2, 3]:
            raise RuntimeError(f"expected one task per node, got {web_tasks}")
        tasks.running(trial, 1)
        result["setup_s"] = time.monotonic() - started
        result["web_tasks"] = web_tasks
        log(f"gateway: lab up in {result['setup_s']:.0f}s; tasks " + ", ".join(
            f"node {t['node']} {t['address']}:{t['port']}" for t in web_tasks))  # fmt: skip
        result["figures"] = {}
        for figure in figures:
            result["figures"][figure] = run_figure(
                lab, web_tasks, figure, rounds, duration, probes if figure == "new_connections" else 0, router_args
            )
        if trials:
            result["trials"] = run_trials(lab, web_tasks, trial, trials, router_args)
        result["flavour"] = docker_flavour()
    return result


def parse_router_args(text: str) -> tuple[str, ...]:
    return tuple(shlex.split(text))
