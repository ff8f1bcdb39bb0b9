"""Data plane: the same nginx backends reached four ways, loaded with wrk from a client namespace.

  direct     client ns -> host routing -> backend 0 (the limit: one forward, no NAT)
  tcprouter  client ns -> host:8401, kernel DNAT by tcprouter's rules to backends 0-2 (round-robin)
  haproxy    client ns -> host:8402, HAProxy in TCP mode on the host, round-robin to backends 0-2
  docker-p   client ns -> host:8403, Docker's published port (-p) of backend 0 (Docker's own DNAT)

Each figure is measured in rounds; a round runs every path once, in an order that rotates between
rounds, so slow drifts of the shared machine hit every path alike. Each figure has its own locked phase
(fresh containers, client namespace, HAProxy, tcprouter), to keep every hold of the host lock short.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tcprouter.compiler import DEFAULT_MARK_BIT, pool_rules
from tcprouter.metrics import backend_connections
from tcprouter.model import Backend, Balance, Frontend
from tcprouter.netfilter import Iptables, detect_flavour
from tests.support import in_netns

from .common import (
    BACKEND_SUBNET,
    LABEL_PREFIX,
    NGINX_IMAGE,
    REPO,
    ClientHost,
    host_lock,
    log,
    median,
    percentile,
    sh,
    unique,
)

BACKEND_PORT = 80
# path -> (port on the host, or None for the backend itself; backends it reaches)
PATHS: dict[str, tuple[int | None, tuple[int, ...]]] = {
    "direct": (None, (0,)),
    "tcprouter": (8401, (0, 1, 2)),
    "haproxy": (8402, (0, 1, 2)),
    "docker-p": (8403, (0,)),
    "direct-3": (None, (0, 1, 2)),  # no proxy: each wrk thread connects straight to one of the 3 backends
    "tcprouter-1": (8404, (3,)),
    # tcprouter's own 3-backend chain (compiler.pool_rules) with every slot pointing at be3, installed by the
    # benchmark under a chain of its own: the rules' cost without the spreading over 3 backends
    "3slots-1be": (8406, (3,)),
    "haproxy-1": (8405, (3,)),
}
ROUTER_PORT = PATHS["tcprouter"][0]
LUA = Path(__file__).with_name("wrk_report.lua")
THREADS = 3  # wrk threads: one per backend for direct-3, the same for every path
BACKENDS = 4
SLOTS_CHAIN = "BENCH-3SLOTS"  # not TCPR-: the daemon must neither own nor remove it
# backend index -> the tcprouter frontend it serves
FRONTEND_OF = {0: 8401, 1: 8401, 2: 8401, 3: 8404}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def who(address: str, port: int, timeout: float = 1.0) -> str:
    from .common import http_get

    return http_get(address, port, "/who", timeout).decode().strip()


class Rig:
    """Backends, client namespace, direct-access rule, HAProxy and tcprouter; all removed on exit."""

    def __init__(
        self, stack: contextlib.ExitStack, router_args: tuple[str, ...] = (), router_command: list[str] | None = None
    ) -> None:
        self.stack = stack
        self.router_command = router_command or [sys.executable, "-m", "tcprouter"]
        self.flavour = str(detect_flavour())
        self.iptables = Iptables(self.flavour)  # type: ignore[arg-type]
        self.router_args = router_args
        self.tag = unique("")
        self.containers: list[str] = []
        self.ips: list[str] = []
        self.hostnames: list[str] = []
        self.router: subprocess.Popen | None = None
        self.haproxy: subprocess.Popen | None = None
        self.metrics_port = 0

    # ---- set-up ------------------------------------------------------------------------------------

    def up(self, paths: tuple[str, ...] = tuple(PATHS)) -> Rig:
        self._tcprouter("cleanup")  # rules left by a run that was killed
        self.clients = {path: ClientHost.create(self.stack, i) for i, path in enumerate(paths)}
        self.network = f"tcpr-bench-{self.tag}"
        sh(
            "docker", "network", "create", "--subnet", f"{BACKEND_SUBNET}.0/24",
            "--gateway", f"{BACKEND_SUBNET}.1", self.network,
        )  # fmt: skip
        self.stack.callback(sh, "docker", "network", "rm", self.network, check=False)
        count = BACKENDS if any(3 in PATHS[path][1] for path in paths) else 3
        for i in range(count):
            self.start_backend(i, FRONTEND_OF[i], publish=(i == 0 and "docker-p" in paths))
        for ip in self.ips:
            wait_for(lambda ip=ip: who(ip, BACKEND_PORT), 20, f"nginx on {ip}")
        self.hostnames = [who(ip, BACKEND_PORT) for ip in self.ips]
        for path in paths:
            if path.startswith("direct"):
                self._direct_rules(path)
        haproxied = [path for path in paths if path.startswith("haproxy")]
        if haproxied:
            self._start_haproxy(haproxied)
        self._start_router([path for path in paths if path.startswith("tcprouter")])
        if "3slots-1be" in paths:
            self._three_slots_one_backend("3slots-1be")
        return self

    def _three_slots_one_backend(self, path: str) -> None:
        port, (index,) = PATHS[path]
        ip = self.ips[index]
        slots = tuple(Backend(f"slot{i}", f"slot{i}-{self.hostnames[index]}", ip, BACKEND_PORT) for i in range(3))
        mark = f"{DEFAULT_MARK_BIT:#x}/{DEFAULT_MARK_BIT:#x}"  # the daemon's mark: TCPR-FORWARD lets the flows in
        rules = pool_rules(Frontend(port, Balance.ROUNDROBIN, slots), mark)
        hook = f"-d {self.clients[path].host_ip}/32 -p tcp -m tcp --dport {port} -j {SLOTS_CHAIN}"
        script = "\n".join(["*nat", f":{SLOTS_CHAIN} - [0:0]", *(f"-A {SLOTS_CHAIN} {r}" for r in rules)])
        self.iptables.restore(script + f"\n-A PREROUTING {hook}\nCOMMIT\n")
        undo = f"*nat\n:{SLOTS_CHAIN} - [0:0]\n-D PREROUTING {hook}\n-X {SLOTS_CHAIN}\nCOMMIT\n"
        self.stack.callback(self.iptables.restore, undo)
        answers = self.client_whos(path, 3)
        if set(answers) != {self.hostnames[index]}:
            raise RuntimeError(f"{path}: expected {self.hostnames[index]} only, got {answers}")

    def start_backend(self, i: int, frontend: int, publish: bool = False, start: bool = True) -> str:
        name = f"tcpr-bench-be{i}-{self.tag}"
        ip = f"{BACKEND_SUBNET}.{11 + i}"
        args = [
            "--name", name, "--network", self.network, "--ip", ip,
            "--label", f"{LABEL_PREFIX}.port={frontend}", "--label", f"{LABEL_PREFIX}.backend_port={BACKEND_PORT}",
        ]  # fmt: skip
        if publish:
            args += ["-p", f"{self.clients['docker-p'].host_ip}:{PATHS['docker-p'][0]}:{BACKEND_PORT}"]
        self.stack.callback(sh, "docker", "rm", "-f", name, check=False)
        sh("docker", "create", *args, NGINX_IMAGE)
        if start:
            sh("docker", "start", name)
        self.containers.append(name)
        self.ips.append(ip)
        return name

    def _direct_rules(self, path: str) -> None:
        """Let the direct client in and count its new connections: an ACCEPT for state NEW per backend at the
        top of DOCKER-USER, whose packet counters add up to the connections. (Docker drops forwarded flows
        to unpublished ports; the established packets pass Docker's own RELATED,ESTABLISHED rule.)"""
        tool = f"iptables-{self.flavour}"
        for i in PATHS[path][1]:
            spec = ["-s", f"{self.clients[path].client_ip}/32", "-d", f"{self.ips[i]}/32", "-p", "tcp"]
            spec += ["--dport", "80", "-m", "conntrack", "--ctstate", "NEW"]
            spec += ["-m", "comment", "--comment", f"tcpr-bench-{path}", "-j", "ACCEPT"]
            sh(tool, "-w", "-I", "DOCKER-USER", "1", *spec)
            self.stack.callback(sh, tool, "-w", "-D", "DOCKER-USER", *spec, check=False)

    def _start_haproxy(self, paths: list[str]) -> None:
        sections = []
        for path in paths:
            port, backends = PATHS[path]
            servers = "\n".join(f"    server b{i} {self.ips[i]}:{BACKEND_PORT}" for i in backends)
            name = path.replace("-", "_")
            sections.append(
                f"frontend {name}\n    bind {self.clients[path].host_ip}:{port}\n    default_backend {name}_pool\n"
                f"backend {name}_pool\n    balance roundrobin\n{servers}\n"
            )
        config = f"""global
    maxconn 9000
    nbthread {os.cpu_count() or 1}
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
{"".join(sections)}"""
        directory = Path(tempfile.mkdtemp(prefix="tcpr-bench-haproxy-"))
        self.stack.callback(sh, "rm", "-rf", str(directory), check=False)
        (directory / "haproxy.cfg").write_text(config)
        out = (directory / "haproxy.log").open("w")
        self.haproxy = subprocess.Popen(
            ["haproxy", "-f", str(directory / "haproxy.cfg"), "-db"], stdout=out, stderr=subprocess.STDOUT
        )
        self.stack.callback(_stop, self.haproxy)
        for path in paths:
            client, port = self.clients[path], PATHS[path][0]
            wait_for(lambda c=client, p=port: in_netns(c.name, lambda: who(c.host_ip, p)), 10, f"HAProxy {path}")

    def _start_router(self, paths: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.metrics_port = s.getsockname()[1]
        self.router_log = Path(tempfile.mkstemp(prefix="tcpr-bench-router-", suffix=".log")[1])
        self.stack.callback(self.router_log.unlink, missing_ok=True)
        self.stack.callback(self._tcprouter, "cleanup")
        out = self.router_log.open("w")
        scripts = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [scripts, os.environ.get("PYTHONPATH")]))}
        self.router = subprocess.Popen(
            [
                *self.router_command, "run", "--label-prefix", LABEL_PREFIX,
                "--flavour", self.flavour, "--metrics-address", f"127.0.0.1:{self.metrics_port}",
                *self.router_args,
            ],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )  # fmt: skip
        self.stack.callback(_stop, self.router)
        for path in paths:
            want = {self.hostnames[i] for i in PATHS[path][1]}
            wait_for(
                lambda p=path, w=want: w <= set(self.client_whos(p, 2 * len(w))) or self.router.poll() is not None,
                20,
                f"tcprouter routing {path} to every backend",
            )
            if self.router.poll() is not None:
                raise RuntimeError(f"tcprouter exited: {self.router_log.read_text()[-2000:]}")

    def client_whos(self, path: str, count: int) -> list[str]:
        """Which backends answer `count` new connections on `path`, from its client namespace."""
        address, port = self.url(path)

        def ask() -> list[str]:
            answers = []
            for _ in range(count):
                with contextlib.suppress(OSError):
                    answers.append(who(address, port))
            return answers

        return in_netns(self.clients[path].name, ask)

    def _tcprouter(self, *args: str) -> None:
        sh(sys.executable, "-m", "tcprouter", *args, "--label-prefix", LABEL_PREFIX, check=False)

    # ---- measuring ---------------------------------------------------------------------------------

    def url(self, path: str) -> tuple[str, int]:
        port, backends = PATHS[path]
        return (self.ips[backends[0]], BACKEND_PORT) if port is None else (self.clients[path].host_ip, port)

    def new_connection_counters(self) -> dict[str, int]:
        """Packets counted by the rules that see only a connection's first packet, per path."""
        _, counted = self.iptables.read(counters=True)
        per_frontend = backend_connections(counted)
        counts = {
            path: sum(n for (port, _), n in per_frontend.items() if port == str(PATHS[path][0]))
            for path in self.clients
            if path.startswith("tcprouter")
        }
        counts["docker-p"] = sum(
            r.packets
            for table, r in counted
            if table == "nat" and r.chain == "DOCKER" and f"--dport {PATHS['docker-p'][0]}" in r.spec
            and "DNAT" in r.spec
        )  # fmt: skip
        if "3slots-1be" in self.clients:
            counts["3slots-1be"] = sum(
                r.packets for t, r in counted if t == "nat" and r.chain == SLOTS_CHAIN and "DNAT" in r.spec
            )
        for path in self.clients:
            if path.startswith("direct"):
                needle = f"--comment tcpr-bench-{path} "
                counts[path] = sum(r.packets for _, r in counted if r.chain == "DOCKER-USER" and needle in r.spec)
        return counts

    def wrk(self, path: str, duration: float, connections: int, close: bool, resource: str = "/") -> dict[str, float]:
        address, port = self.url(path)
        targets = ",".join(f"{self.ips[i]}:{BACKEND_PORT}" for i in PATHS[path][1]) if path == "direct-3" else ""
        command = wrk_command(self.clients[path].name, address, port, targets, duration, connections, close, resource)
        self.forget_connections()
        before_syn = _syn_retransmits(self.clients[path].name)
        before_stats = _conntrack_stats()
        before_drops = _conntrack_drops()
        before_counters = self.new_connection_counters()
        before_cpu = _cpu_times()
        before_proc = {name: _proc_cpu(p) for name, p in (("haproxy", self.haproxy), ("tcprouter", self.router))}
        done = run_wrk(command, path, duration)
        cpu = _cpu_busy(before_cpu, _cpu_times())
        proc = {
            name: _proc_cpu(p) - before_proc[name]
            for name, p in (("haproxy", self.haproxy), ("tcprouter", self.router))
        }
        after_counters = self.new_connection_counters()
        conntrack_drops = _conntrack_drops() - before_drops
        after_stats = _conntrack_stats()
        syn_retransmits = _syn_retransmits(self.clients[path].name) - before_syn
        peak_entries = _conntrack_count()
        result = wrk_result(done)
        result["cpu_busy_fraction"] = cpu
        result["proxy_cpu_s"] = proc["haproxy"] if path.startswith("haproxy") else 0.0
        result["router_cpu_s"] = proc["tcprouter"]
        result["conntrack_drops"] = conntrack_drops  # host-wide: packets dropped because the table was full
        result["conntrack_entries_after"] = peak_entries
        result["syn_retransmits"] = syn_retransmits  # the client's TcpExt TCPSynRetrans: SYNs sent again
        result["conntrack_stats"] = {k: after_stats[k] - before_stats.get(k, 0) for k in after_stats}
        if path in after_counters:
            result["new_connections_counted"] = after_counters[path] - before_counters[path]
        return result

    def forget_connections(self) -> None:
        """Delete our clients' conntrack entries (and only theirs) before a run.

        At ~30,000 new connections/s, every one leaving an entry in TIME_WAIT for 120 s, the host's table
        (nf_conntrack_max 262,144 here) would fill within a run and drop SYNs, for everyone on the host.
        """
        for client in self.clients.values():
            subprocess.run(["conntrack", "-D", "-s", client.client_ip], capture_output=True, check=False, timeout=60)

    def probe(self, path: str, count: int) -> dict[str, list[float]]:
        return latency_probe(self.clients[path].name, *self.url(path), count)

    def router_warnings(self) -> list[str]:
        return log_problems(self.router_log)

    def router_rss_kb(self) -> int:
        return rss_kb(self.router)


def wrk_command(
    ns: str, address: str, port: int, targets: str, duration: float, connections: int, close: bool, resource: str
) -> list[str]:
    """wrk from namespace `ns` with the report script; `targets` ("ip:port,..."): one per thread, not the URL."""
    return [
        "env", f"BENCH_TARGETS={targets}",
        "ip", "netns", "exec", ns, "wrk", f"-t{THREADS}", f"-c{connections}", f"-d{duration:g}s",
        "--latency", "-s", str(LUA), *(["-H", "Connection: close"] if close else []),
        f"http://{address}:{port}{resource}",
    ]  # fmt: skip


def run_wrk(command: list[str], path: str, duration: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=duration + 30, check=False)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"wrk on {path} did not finish within {duration + 30:g}s") from error


def wrk_result(done: subprocess.CompletedProcess) -> dict:
    """wrk's report (the WRKJSON line of the report script) with rates and the error total."""
    line = next((x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}")
    result = json.loads(line.removeprefix("WRKJSON "))
    seconds = result["duration_us"] / 1e6
    result["rps"] = result["requests"] / seconds
    result["bytes_per_s"] = result["bytes"] / seconds
    result["errors"] = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return result


def latency_probe(ns: str, address: str, port: int, count: int) -> dict[str, list[float]]:
    """Unloaded latency from namespace `ns`: `count` sequential new connections, one request each; microseconds to
    connect and to the first byte of the answer."""
    request = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"

    def run() -> dict[str, list[float]]:
        connect, first = [], []
        for _ in range(count):
            s = socket.socket()
            s.settimeout(2)
            t0 = time.perf_counter_ns()
            s.connect((address, port))
            t1 = time.perf_counter_ns()
            s.sendall(request)
            s.recv(1)
            t2 = time.perf_counter_ns()
            while s.recv(65536):
                pass
            s.close()
            connect.append((t1 - t0) / 1e3)
            first.append((t2 - t0) / 1e3)
        return {"connect_us": connect, "first_byte_us": first}

    return in_netns(ns, run)


def probe_samples(rig, paths: tuple[str, ...], probes: int) -> dict[str, dict[str, dict[str, float]]]:
    """`probes` latency samples per path, in 4 interleaved blocks (so that drifts hit every path): n, p50, p99."""
    samples: dict[str, dict[str, list[float]]] = {p: {"connect_us": [], "first_byte_us": []} for p in paths}
    for _block in range(4):
        for path in paths:
            for key, values in rig.probe(path, probes // 4).items():
                samples[path][key] += values
    return {
        path: {key: {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99)} for key, v in got.items()}
        for path, got in samples.items()
    }


def log_problems(path: Path) -> list[str]:
    """The daemon's warnings and errors so far (retries, drift, failures), for the result file."""
    text = path.read_text() if path.exists() else ""
    return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line][-50:]


def rss_kb(process: subprocess.Popen | None) -> int:
    """A running child's resident memory (0 once it has exited)."""
    if process is None or process.poll() is not None:
        return 0
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


def _conntrack_drops() -> int:
    """Packets dropped by conntrack (table full, allocation failure), summed over the CPUs."""
    lines = Path("/proc/net/stat/nf_conntrack").read_text().splitlines()
    column = lines[0].split().index("drop")
    return sum(int(line.split()[column], 16) for line in lines[1:])


def _conntrack_stats() -> dict[str, int]:
    """Every conntrack statistic (insert_failed, clash_resolve, invalid...), summed over the CPUs."""
    lines = Path("/proc/net/stat/nf_conntrack").read_text().splitlines()
    names = lines[0].split()
    totals = dict.fromkeys(names, 0)
    for line in lines[1:]:
        for name, value in zip(names, line.split(), strict=False):
            totals[name] += int(value, 16)
    totals.pop("entries", None)
    return totals


def _syn_retransmits(ns: str) -> int:
    text = sh("ip", "netns", "exec", ns, "cat", "/proc/net/netstat")
    lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    return int(lines[1][lines[0].index("TCPSynRetrans")])


def _conntrack_count() -> int:
    return int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields[:8]), idle


def _cpu_busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    total, idle = after[0] - before[0], after[1] - before[1]
    return round(1 - idle / total, 3) if total else 0.0


def _proc_cpu(process: subprocess.Popen | None) -> float:
    if process is None or process.poll() is not None:
        return 0.0
    fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the figures -------------------------------------------------------------------------------------

FIGURES = {
    # name: (wrk connections, Connection: close, resource, what the figure is)
    "new_connections": (33, True, "/", "new connections/s, one 3-byte request per connection"),
    "keepalive": (33, False, "/", "requests/s over 33 keep-alive connections"),
    "bulk": (3, False, "/static/big", "bytes/s over 3 keep-alive connections fetching a 64 MiB file"),
}


def run_figure(figure: str, rounds: int, duration: float, probes: int) -> dict:
    connections, close, resource, what = FIGURES[figure]
    paths = tuple(p for p in PATHS if figure == "new_connections" or p != "3slots-1be")  # rules: first packet only
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    extra: dict[str, object] = {}
    with host_lock(f"data plane: {figure}"), contextlib.ExitStack() as stack:
        rig = Rig(stack).up(paths)
        log(f"{figure}: backends {rig.ips}, {rig.flavour} tables")
        for path in paths:  # warm-up: ARP, conntrack, page cache, nginx workers
            rig.wrk(path, 1, connections, close, resource)
        rig.forget_connections()
        for r in range(rounds):
            order = paths[r % len(paths) :] + paths[: r % len(paths)]
            for path in order:
                result = rig.wrk(path, duration, connections, close, resource)
                runs[path].append(result)
                log(
                    f"{figure} round {r + 1}/{rounds} {path:<9} {result['rps']:>9.0f} req/s "
                    f"{result['bytes_per_s'] / 2**20:>8.1f} MiB/s p50 {result['lat_p50_us']}us "
                    f"p99 {result['lat_p99_us']}us err {result['errors']} "
                    f"counted {result.get('new_connections_counted', '-')} cpu {result['cpu_busy_fraction']} "
                    f"router cpu {result['router_cpu_s']:.2f}s conntrack drops {result['conntrack_drops']} "
                    f"SYN retransmits {result['syn_retransmits']} "
                    f"{ {k: v for k, v in result['conntrack_stats'].items() if v and k not in ('found', 'searched')} }"
                )
        if probes:
            extra["probe"] = probe_samples(rig, paths, probes)
        extra["router_rss_kb"] = rig.router_rss_kb()
        extra["router_warnings"] = rig.router_warnings()
        extra["flavour"] = rig.flavour
        rig.forget_connections()
    return {"figure": figure, "what": what, "duration_s": duration, "rounds": rounds, "runs": runs, **extra,
            "median": _medians(runs)}  # fmt: skip


def _medians(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    keys = ("rps", "bytes_per_s", "lat_p50_us", "lat_p99_us", "errors", "cpu_busy_fraction", "proxy_cpu_s")
    return {path: {k: median([r[k] for r in rs]) for k in keys} for path, rs in runs.items() if rs}
