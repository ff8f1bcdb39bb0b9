"""Shared pieces of the benchmark: commands, the host lock, namespaces, statistics, cleanup.

Everything created here is registered on a contextlib.ExitStack by its creator, so it is removed even
when a phase fails halfway.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK_PATH = "/run/tcprouter-tests.lock"
NGINX_IMAGE = "tcprouter-bench/nginx:latest"
BASE_IMAGE = "tcprouter-build/debian:bookworm"
CLIENT_SUBNET = "203.0.113"  # this benchmark's client side (others' e2e tests use 198.51.100.0/24)
BACKEND_SUBNET = "198.18.113"  # RFC 2544 benchmarking range: the Docker network of the backends
LABEL_PREFIX = "tcpbench"  # our own label namespace: no other tcprouter ever picks our containers up


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sh(*args: str, check: bool = True, input: str | None = None, timeout: float = 120) -> str:
    done = subprocess.run(args, capture_output=True, text=True, input=input, check=False, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


@contextlib.contextmanager
def host_lock(what: str) -> Iterator[None]:
    """Exclusive use of the host's tables and of a client namespace, for as short a time as possible."""
    started = time.monotonic()
    with open(LOCK_PATH, "w") as lock:
        log(f"waiting for {LOCK_PATH} ({what})")
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = time.monotonic()
        log(f"lock held after {held - started:.1f}s wait: {what}")
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            log(f"lock released after {time.monotonic() - held:.1f}s ({what})")


def netns_add(stack: contextlib.ExitStack, prefix: str) -> str:
    name = unique(prefix)
    sh("ip", "netns", "add", name)
    stack.callback(sh, "ip", "netns", "del", name, check=False)
    sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
    return name


def veth(
    stack: contextlib.ExitStack, a_ns: str | None, a_ip: str, b_ns: str, b_ip: str, tag: str, prefix: int = 24
) -> tuple[str, str]:
    """A veth pair between namespace a (None: the host) and b, with addresses; removed with a."""
    a_if, b_if = f"tb{tag}a", f"tb{tag}b"
    sh("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if)
    if a_ns is None:
        stack.callback(sh, "ip", "link", "del", a_if, check=False)
    for ns, ifname, ip in ((a_ns, a_if, a_ip), (b_ns, b_if, b_ip)):
        if ns:
            sh("ip", "link", "set", ifname, "netns", ns)
        run = ("ip", "netns", "exec", ns) if ns else ()
        sh(*run, "ip", "addr", "add", f"{ip}/{prefix}", "dev", ifname)
        sh(*run, "ip", "link", "set", ifname, "up")
    return a_if, b_if


def tune_client(ns: str) -> None:
    """A load generator's namespace: the whole ephemeral port range, TIME_WAIT reuse."""
    for key, value in (("net.ipv4.ip_local_port_range", "1024 65000"), ("net.ipv4.tcp_tw_reuse", "1")):
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}")


@dataclass
class ClientHost:
    """A namespace behind a veth pair, on its own /28 of 203.0.113.0/24: an external client of this host.

    Each load path gets its own client (and so its own source address): conntrack keys connections by
    their original tuple, so two paths that reach the same backend from the same client address and port
    would clash on the reply tuple and have their SYNs dropped (see BENCHMARKS.md).
    """

    name: str
    index: int

    @property
    def host_ip(self) -> str:
        return f"{CLIENT_SUBNET}.{16 * self.index + 1}"

    @property
    def client_ip(self) -> str:
        return f"{CLIENT_SUBNET}.{16 * self.index + 2}"

    @classmethod
    def create(cls, stack: contextlib.ExitStack, index: int = 0) -> ClientHost:
        ns = netns_add(stack, "tcpr-bench-cli-")
        host = cls(ns, index)
        veth(stack, None, host.host_ip, ns, host.client_ip, ns[-6:], prefix=28)
        sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", host.host_ip)
        tune_client(ns)
        return host


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def http_get(address: str, port: int, path: str = "/", timeout: float = 2.0) -> bytes:
    """One request on a new connection (HTTP/1.0: the server closes); the body."""
    with socket.create_connection((address, port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2]


def ensure_packages() -> None:
    """wrk, haproxy and conntrack from Debian, if missing (Debian's haproxy package starts no daemon here)."""
    tools = (("wrk", "wrk"), ("haproxy", "haproxy"), ("conntrack", "conntrack"))
    missing = [pkg for tool, pkg in tools if not shutil.which(tool)]
    if missing:
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            check=True,
            capture_output=True,
            env=env,
        )


def ensure_images() -> None:
    if sh("docker", "images", "-q", BASE_IMAGE).strip() == "":
        log(f"building {BASE_IMAGE} (scripts/build-base-image, about a minute)")
        subprocess.run([str(REPO / "scripts/build-base-image"), BASE_IMAGE], check=True)
    log(f"building {NGINX_IMAGE}")
    sh("docker", "build", "-q", "-t", NGINX_IMAGE, str(REPO / "scripts/bench-images/nginx"), timeout=600)


def tool_version(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].split(" Copyright")[0].strip() if text else "unknown"


def machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = match.group(1) if match else ""
    mem_kb = 0
    with contextlib.suppress(OSError, AttributeError):
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": os.uname().release,
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "docker": sh("docker", "version", "--format", "{{.Server.Version}}", check=False).strip(),
        "iptables": tool_version("iptables", "-V"),
        "wrk": tool_version("wrk", "-v"),
        "haproxy": tool_version("haproxy", "-v"),
        "nginx": tool_version("docker", "run", "--rm", NGINX_IMAGE, "nginx", "-v"),
    }
