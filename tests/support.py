"""Test helpers: network namespaces as external hosts, polling with deadlines, real TCP clients,
the tcprouter daemon as a child process. Everything created here is removed by its owner, even on failure."""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tcprouter.hostports import proc_net_endpoint

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
BACKEND_IMAGE = "tcprouter-test/backend:latest"
BACKEND_PORT = 1234
UNEXPOSED_PORT = 8080
CLIENT_SUBNET = "198.51.100"  # documentation range: the "public" side of the host
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*args: str, check: bool = True, input: str | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, input=input, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.02, what: str = "condition") -> T:
    """Poll until `predicate()` is truthy; return its value, or fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {value!r})")
        time.sleep(interval)


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(3)}"


def join_netns(name: str) -> None:
    """Move the calling thread (only it) into network namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
    finally:
        os.close(fd)


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that has joined network namespace `name` (None: the host's)."""
    if name is None:
        return fn()
    result: dict[str, object] = {}

    def target() -> None:
        try:
            join_netns(name)
            result["value"] = fn()
        except BaseException as error:
            result["error"] = error

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def greet(address: str, port: int, timeout: float = 3.0) -> str:
    """Connect, read the backend's one-line greeting, close. Raises OSError if refused or silent."""
    with socket.create_connection((address, port), timeout=timeout) as conn:
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(256)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


def greetings(ns: str | None, address: str, port: int, count: int, timeout: float = 3.0) -> list[str]:
    """`count` sequential connections from namespace `ns`; the address each backend reports."""
    return in_netns(ns, lambda: [greet(address, port, timeout).removeprefix("Hi from ") for _ in range(count)])


def udp_flow(ns: str | None) -> socket.socket:
    """A UDP socket of namespace `ns` (it stays there whichever thread uses it): one flow per destination."""
    return in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))


def udp_ask(flow: socket.socket, address: str, port: int, timeout: float = 3.0) -> str:
    """One datagram on `flow`, and the address of the backend that answers it. Raises TimeoutError if none does."""
    token = secrets.token_hex(4).encode()
    flow.settimeout(timeout)
    flow.sendto(token, (address, port))
    deadline = time.monotonic() + timeout
    while True:  # a late answer to an earlier datagram is not this one's
        flow.settimeout(max(deadline - time.monotonic(), 0.001))
        identity, _, echoed = flow.recv(2048).decode().partition("\n")
        if echoed.encode() == token:
            return identity.removeprefix("Hi from ")


def udp_greetings(ns: str | None, address: str, port: int, count: int, timeout: float = 3.0) -> list[str]:
    """`count` new UDP flows (a fresh socket each) from namespace `ns`; the backend that answered each."""
    answers = []
    for _ in range(count):
        with udp_flow(ns) as flow:
            answers.append(udp_ask(flow, address, port, timeout))
    return answers


def connect_outcome(ns: str | None, address: str, port: int, timeout: float = 2.0) -> str:
    """'answered', 'refused' or 'timeout': how a connection attempt ends."""

    def attempt() -> str:
        try:
            greet(address, port, timeout)
            return "answered"
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        except ConnectionResetError:
            return "refused"

    return in_netns(ns, attempt)


@dataclass
class ClientHost:
    """A network namespace on 198.51.100.0/24 behind a veth pair: an external client of the host."""

    name: str = field(default_factory=lambda: unique("tcpr-cli-"))
    host_ip: str = f"{CLIENT_SUBNET}.1"
    client_ip: str = f"{CLIENT_SUBNET}.2"

    def __post_init__(self) -> None:
        self.host_if = "tcpr" + self.name[-6:] + "h"
        self.client_if = "tcpr" + self.name[-6:] + "c"

    def create(self) -> ClientHost:
        sh("ip", "netns", "add", self.name)
        try:
            sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.client_if)
            sh("ip", "link", "set", self.client_if, "netns", self.name)
            sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            sh("ip", "link", "set", self.host_if, "up")
            ns = ("ip", "netns", "exec", self.name)
            sh(*ns, "ip", "addr", "add", f"{self.client_ip}/24", "dev", self.client_if)
            sh(*ns, "ip", "link", "set", self.client_if, "up")
            sh(*ns, "ip", "link", "set", "lo", "up")
            sh(*ns, "ip", "route", "add", "default", "via", self.host_ip)
        except Exception:
            self.destroy()
            raise
        return self

    def forget_flows(self) -> None:
        """Delete the host's conntrack entries of this client's connections. The client reuses its source
        ports within a minute under load, and an entry that an earlier test left half-open (say, a SYN to a
        node it cut off) would carry a reused port's new SYN to that test's long-gone backend."""
        sh("conntrack", "-D", "-s", self.client_ip, check=False)

    def destroy(self) -> None:
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.name, check=False)


@contextmanager
def private_netns() -> Iterator[str]:
    """An empty network namespace (its own, empty netfilter tables), removed afterwards."""
    name = unique("tcpr-k-")
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@contextmanager
def host_rules_lock() -> Iterator[None]:
    """Only one test session at a time may run tcprouter against this host's real tables."""
    with open("/run/tcprouter-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def owned_rules_in_host(flavour: str) -> list[str]:
    text = sh(f"iptables-{flavour}-save")
    return [line for line in text.splitlines() if "TCPR-" in line]


def foreign_rules_in_host(flavour: str) -> list[str]:
    """Every rule and chain not owned by tcprouter, counters stripped: must never change."""
    lines = []
    for line in sh(f"iptables-{flavour}-save").splitlines():
        if line.startswith("#") or "TCPR-" in line:
            continue
        if line.startswith(":"):
            line = line.rsplit(" ", 1)[0]  # drop the chain's [packets:bytes]
        lines.append(line)
    return lines


class Router:
    """`tcprouter run` as a child process (in network namespace `netns`, else the host's); stopped by its own
    PID (`ip netns exec` execs the daemon in its place)."""

    def __init__(self, *args: str, metrics_port: int | None = None, netns: str | None = None) -> None:
        self.netns = netns
        self.metrics_port = metrics_port or free_port()
        # Every scrape reads the kernel: the tests compare exact counts right after traffic.
        self.args = [
            "run",
            *("--metrics-address", f"127.0.0.1:{self.metrics_port}", "--metrics-read-interval", "0"),
            *("--log-level", "debug", *args),
        ]
        self.log_path = Path(f"/tmp/{unique('tcprouter-test-')}.log")
        self.process: subprocess.Popen | None = None

    def start(self) -> Router:
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                *(("ip", "netns", "exec", self.netns) if self.netns else ()),
                sys.executable,
                "-m",
                "tcprouter",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        wait_until(lambda: self.synced() or self.standing_by() or self.exited(), 20, 0.05, "tcprouter's first sync")
        assert not self.exited(), self.log()
        return self

    def synced(self) -> bool:
        return "tcprouter_last_sync_timestamp_seconds" in self.metrics_text() and self.last_sync() > 0

    def standing_by(self) -> bool:
        """Waiting as a hot standby (--standby) while another instance owns the tables."""
        return "tcprouter_leader 0.0" in self.metrics_text().splitlines()

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def metrics_text(self) -> str:
        return in_netns(self.netns, lambda: scrape(self.metrics_port))

    def last_sync(self) -> float:
        for line in self.metrics_text().splitlines():
            if line.startswith("tcprouter_last_sync_timestamp_seconds "):
                return float(line.split()[1])
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def scrape(port: int) -> str:
    """The /metrics page of a router on this host's loopback, or "" while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return reply.read().decode()
    except OSError:
        return ""


def tcprouter(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tcprouter", *args], capture_output=True, text=True, cwd=REPO)
    if check and done.returncode != 0:
        raise AssertionError(f"tcprouter {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peers_of(pid: int, local_port: int) -> list[str]:
    """Remote addresses of established TCP connections on `local_port`, read from /proc/PID/net/tcp{,6}
    (the tables of that process's network namespace: the backend's side of the socket)."""
    peers = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and proc_net_endpoint(local)[1] == local_port:  # 01: TCP_ESTABLISHED
                peers.append(str(proc_net_endpoint(remote)[0]))
    return peers


class DockerSocketProxy:
    """A relay to the Docker API socket that a test can cut and restore: it takes Docker away from
    tcprouter (as a daemon restart would) without touching the daemon other tests use. It can also hang
    (keep every connection open but forward nothing, as a wedged daemon does) and run a test's hook just
    before the response to one request is relayed."""

    def __init__(self, upstream: str = "/var/run/docker.sock") -> None:
        self.upstream = upstream
        self.path = f"/tmp/{unique('tcpr-docker-')}.sock"
        self.url = f"unix://{self.path}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._interposed: tuple[bytes, Callable[[], None]] | None = None

    def start(self) -> DockerSocketProxy:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def interpose(self, path: str, hook: Callable[[], None]) -> None:
        """Run `hook` once, when the first response to a request for an API path containing `path` arrives
        from Docker, before it is relayed: the client's request has been answered, the client has not seen it."""
        self._interposed = (path.encode(), hook)

    def hang(self) -> None:
        """Forward nothing more, in either direction, on open or new connections; keep them all open."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.upstream)
            with self._lock:
                self._open += [client, server]
            requests: list[bytes] = []  # the request lines sent on this connection so far
            for source, sink in ((client, server), (server, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink, requests, source is client), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: list[bytes], upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if upstream and re.match(rb"[A-Z]+ /", data):
                    requests.append(data.split(b"\r\n", 1)[0])
                elif not upstream and requests:
                    self._before_response(requests[-1])
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _before_response(self, request_line: bytes) -> None:
        with self._lock:
            interposed = self._interposed
            if interposed is None or interposed[0] not in request_line:
                return
            self._interposed = None
        interposed[1]()

    def cut(self) -> None:
        """Refuse new connections and break the open ones, as a stopped daemon would."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for s in self._open:
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()
        self._flowing.set()  # a hung relay's pumps wake up to find their sockets closed
        Path(self.path).unlink(missing_ok=True)


@dataclass
class Load:
    """Sequential new connections from a namespace at a bounded rate, in a background thread; each
    outcome recorded with its start time (monotonic) and the backend that answered (or the error)."""

    ns: str
    address: str
    port: int
    interval: float = 0.01
    limit: int = 2000
    outcomes: list[tuple[float, str | None, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=in_netns, args=(self.ns, self._run), daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.outcomes) < self.limit:
            started = time.monotonic()
            try:
                answer = greet(self.address, self.port, timeout=2).removeprefix("Hi from ")
                self.outcomes.append((started, answer, None))
            except OSError as error:
                self.outcomes.append((started, None, repr(error)))
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))  # pacing, not synchronisation

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        self._thread.join(30)
        return self

    def wait(self, timeout: float) -> Load:
        self._thread.join(timeout)
        return self.stop()

    @property
    def failures(self) -> list[tuple[float, str | None, str | None]]:
        return [o for o in self.outcomes if o[2] is not None]


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def invalid_segment_crosses(sender: str, source: str, receiver: str, destination: str, timeout: float = 5) -> bool:
    """Whether a SYN+RST segment (INVALID for conntrack: no flow may carry both) sent from namespace `sender`
    (address `source`) reaches namespace `receiver` (`destination`); sent again until it does or `timeout` s."""
    sport, dport = 40000 + secrets.randbelow(20000), 9
    header = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02 | 0x04, 1024, 0, 0)
    pseudo = socket.inet_aton(source) + socket.inet_aton(destination) + struct.pack("!BBH", 0, 6, len(header))
    segment = header[:16] + struct.pack("!H", _checksum(pseudo + header)) + header[18:]

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
            raw.sendto(segment, (destination, 0))

    sniffer = in_netns(receiver, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
    with sniffer:
        sniffer.settimeout(0.2)

        def arrived() -> bool:
            in_netns(sender, send)
            try:
                while True:
                    packet = sniffer.recv(4096)
                    ihl = (packet[0] & 0x0F) * 4
                    if packet[ihl : ihl + 4] == struct.pack("!HH", sport, dport):
                        return True
            except TimeoutError:
                return False

        try:
            return wait_until(arrived, timeout, what="the INVALID segment to arrive")
        except AssertionError:
            return False


@contextmanager
def greeter(ns: str, address: str, name: str, port: int = 0, hold: bool = False) -> Iterator[int]:
    """A listener in `ns` on `address`:`port` (0: any free one) that answers each connection with `Hi from <name>`
    and closes it, or with `hold` keeps it open until the greeter ends (connections that stay counted); its port."""
    listener = in_netns(ns, lambda: socket.create_server((address, port), backlog=64))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(f"Hi from {name}\n".encode())
            if hold:
                held.append(conn)
            else:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for conn in held:
            conn.close()
