"""A multi-host lab on one machine: real Docker engines, each in its own network namespace behind a host bridge,
optionally joined into a Swarm. This host is the front server between them and the client namespaces.

    host  198.18.99.1 on bridge tcpr-br<hex>
    node i  198.18.99.1i in namespace tcpr-<hex>-n<i>: dockerd on unix:///run/tcpr-<hex>-n<i>/docker.sock and on
            tcp://198.18.99.1i:2375 (reachable from the host over the bridge only), containers on 172.30.i.0/24

With `subnet6` the bridge and the nodes have IPv6 addresses too (host <subnet6>1, node i <subnet6>1i, /64), and with
`daemon_config` (ipv6, ip6tables...) each dockerd routes IPv6 itself. `add_client()` puts a client namespace on the
bridge.

Everything a lab creates is removed by `destroy()`, even after a partial `create()`. Only one lab per subnet runs on
the host at a time (a file lock); the two session fixtures use different subnets, so both may be alive at once."""

from __future__ import annotations

import fcntl
import glob
import ipaddress
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypedDict, TypeVar

import docker
import pytest

from tcprouter.netfilter import detect_flavour

from .support import BACKEND_IMAGE, BACKEND_PORT, connect_outcome, sh, unique, wait_until

T = TypeVar("T")
ENGINE_PORT = 2375  # the plain-TCP Docker API of each node, for the gateway's "engines" mode
SWARM_PORT = 2377
# A Swarm task's command: answer "Hi from <address>" on 1234 as the image's CMD does; on SIGTERM keep serving
# for 2 s, then exit 0 (busybox sh runs the trap as soon as the signal interrupts `wait`; PID 1's exit ends nc).
GRACEFUL_COMMAND = ("sh", "-c", f"trap 'sleep 2; exit 0' TERM; nc -ll -p {BACKEND_PORT} -e /bin/hi & wait")
GRACEFUL_SECONDS = 2.0
_SUBNETS_IN_USE: set[str] = set()  # by the labs of this process


def _each(fn: Callable[[T], object], items: Iterable[T]) -> None:
    """Run `fn` on every item concurrently; raise the first error once all are done."""
    items = list(items)
    if not items:
        return
    with ThreadPoolExecutor(len(items)) as pool:
        for future in [pool.submit(fn, item) for item in items]:
            future.result()


def _resolvers() -> list[str]:
    """The IPv4 nameservers of /etc/resolv.conf."""
    found = []
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and ipaddress.ip_address(parts[1]).version == 4:
            found.append(parts[1])
    return found


def _mounts_under(roots: Sequence[Path]) -> list[str]:
    """Mount points at or below any of `roots`, deepest (most recently mounted) first."""
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        point = line.split()[1].encode().decode("unicode_escape")  # /proc/mounts writes a space as \040
        if any(point == str(root) or point.startswith(f"{root}/") for root in roots):
            found.append(point)
    return found[::-1]


def _netns_pids(ns_path: str) -> list[int]:
    """PIDs of the processes in the network namespace bound at `ns_path` (never this test process)."""
    try:
        target = os.stat(ns_path).st_ino
    except FileNotFoundError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if os.stat(entry / "ns" / "net").st_ino == target:
                    pids.append(int(entry.name))
            except OSError:
                continue  # exited meanwhile
    return pids


def _cgroup_pids(cgroups: Sequence[str]) -> list[int]:
    """PIDs of the processes in any of `cgroups` (paths as /proc/PID/cgroup lists them)."""
    if not cgroups:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines = (entry / "cgroup").read_text().splitlines()
            except OSError:
                continue  # exited meanwhile
            if any(line.split(":", 2)[2] in cgroups for line in lines):
                pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _answers(url: str) -> bool:
    try:
        client = docker.APIClient(base_url=url, version="1.41", timeout=2)
        try:
            return client.ping()
        finally:
            client.close()
    except (OSError, docker.errors.DockerException):
        return False


@dataclass
class Node:
    """One engine of the lab: its namespace, addresses, directories and dockerd process."""

    index: int
    ns: str
    address: str
    host_if: str
    bip: str
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def data_root(self) -> Path:
        return Path(f"/var/lib/{self.ns}")

    @property
    def exec_root(self) -> Path:
        return Path(f"/run/{self.ns}")

    @property
    def pidfile(self) -> Path:
        return self.exec_root / "dockerd.pid"

    @property
    def socket_url(self) -> str:
        return f"unix://{self.exec_root}/docker.sock"

    @property
    def tcp_url(self) -> str:
        return f"tcp://{self.address}:{ENGINE_PORT}"

    @property
    def ns_path(self) -> str:
        return f"/run/netns/{self.ns}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else "(no log)"
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class DockerLab:
    """`nodes` Docker engines on one host, each in a network namespace on a bridge; a Swarm if `swarm`."""

    nodes: int = 3
    swarm: bool = True
    subnet: str = "198.18.99"  # benchmarking range: host .1, node i .1i
    images: Sequence[str] = ()  # loaded into every node besides the backend image
    bridge: str = field(default_factory=lambda: unique("tcpr-br"))
    subnet6: str | None = None  # an IPv6 /64 prefix like "fd00:97::": the bridge and the nodes get addresses in it
    daemon_config: Mapping[str, object] = field(default_factory=dict)  # more daemon.json settings for every node
    members: list[Node] = field(init=False, default_factory=list)
    clients: list[str] = field(init=False, default_factory=list)  # namespaces add_client() made

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 9:
            raise ValueError("a lab has 1 to 9 nodes")
        lab_id = self.bridge[-6:]
        self.members = [
            Node(
                index=i,
                ns=f"tcpr-{lab_id}-n{i}",
                address=f"{self.subnet}.1{i}",
                host_if=f"tcpr{lab_id}n{i}",
                bip=f"172.30.{i}.1/24",
                log_path=Path(f"/tmp/tcpr-{lab_id}-n{i}-dockerd.log"),
            )
            for i in range(1, self.nodes + 1)
        ]
        self.host_address = f"{self.subnet}.1"
        self._forward_rules: list[list[str]] = []
        self._clients: dict[int, docker.APIClient] = {}
        self._lock: IO[str] | None = None

    # --- what tests use -------------------------------------------------------------------------------------

    @property
    def manager_url(self) -> str:
        return self.node_url(1)

    def node(self, i: int) -> Node:
        if not 1 <= i <= self.nodes:
            raise IndexError(f"node {i} not in 1..{self.nodes}")
        return self.members[i - 1]

    def node_url(self, i: int) -> str:
        return self.node(i).socket_url

    def engine_tcp_url(self, i: int) -> str:
        return self.node(i).tcp_url

    def node_address(self, i: int) -> str:
        return self.node(i).address

    def node_ns(self, i: int) -> str:
        return self.node(i).ns

    def docker(self, i: int, *args: str, timeout: float = 60) -> str:
        """Run the docker CLI against node i; its stdout. Raises with stderr and the engine's log tail."""
        node = self.node(i)
        done = subprocess.run(
            ["docker", "-H", node.socket_url, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"docker -H {node.socket_url} {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}\n"
                f"--- {node.log_path} ---\n{node.log_tail()}"
            )
        return done.stdout

    def api(self, i: int) -> docker.APIClient:
        """A low-level Docker API client for node i (one per node, closed by `destroy()`)."""
        if i not in self._clients:
            self._clients[i] = docker.APIClient(base_url=self.node_url(i), version="auto", timeout=30)
        return self._clients[i]

    def node_address6(self, i: int) -> str:
        if self.subnet6 is None:
            raise ValueError("this lab has no IPv6 subnet")
        return f"{self.subnet6}1{self.node(i).index}"

    def add_client(self, index: int) -> tuple[str, str, str | None]:
        """A client namespace on the lab bridge, at <subnet>.<index> (and <subnet6><index>): (its name, its IPv4
        and IPv6 addresses). Removed by `destroy()`."""
        name = unique("tcpr-lcl-")
        self.clients.append(name)
        sh("ip", "netns", "add", name)
        host_if = f"{self.bridge[-6:]}c{index}"
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
        sh("ip", "link", "set", host_if, "master", self.bridge, "up")
        address, address6 = f"{self.subnet}.{index}", f"{self.subnet6}{index}" if self.subnet6 else None
        self._address(name, address, address6)
        return name, address, address6

    def _address(self, ns: str, address: str, address6: str | None) -> None:
        """Addresses on `ns`'s eth0 (IPv6 without duplicate address detection: usable at once), link and lo up."""
        in_ns = ("ip", "-n", ns)
        sh(*in_ns, "addr", "add", f"{address}/24", "dev", "eth0")
        if address6:
            sh(*in_ns, "addr", "add", f"{address6}/64", "dev", "eth0", "nodad")
        sh(*in_ns, "link", "set", "eth0", "up")
        sh(*in_ns, "link", "set", "lo", "up")

    def link_down(self, i: int) -> None:
        """Set the host end of node i's veth down: the node is cut off, as by a cable pull."""
        sh("ip", "link", "set", self.node(i).host_if, "down")

    def link_up(self, i: int) -> None:
        sh("ip", "link", "set", self.node(i).host_if, "up")

    # --- life cycle -----------------------------------------------------------------------------------------

    def create(self) -> DockerLab:
        """Build the network, start and wait for the engines, load the images, form the Swarm."""
        self._take_subnet()
        try:
            self._create_network()
            _each(self._start_engine, self.members)
            self._load_images()
            if self.swarm:
                self._form_swarm()
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Remove everything `create()` made, whatever state it got to; safe to call twice."""
        errors: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as error:
                errors.append(f"{what}: {error}")

        for client in self._clients.values():
            client.close()
        self._clients.clear()
        _each(lambda node: attempt(f"stopping node {node.index}", lambda: self._stop_engine(node)), self.members)
        for node in self.members:
            attempt(f"removing {node.data_root} and {node.exec_root}", lambda node=node: self._remove_dirs(node))
            if Path(node.ns_path).exists():
                attempt(f"deleting namespace {node.ns}", lambda node=node: sh("ip", "netns", "del", node.ns))
            if Path(f"/sys/class/net/{node.host_if}").exists():
                attempt(f"deleting {node.host_if}", lambda node=node: sh("ip", "link", "del", node.host_if))
        for client in self.clients:
            if Path(f"/run/netns/{client}").exists():
                attempt(f"deleting namespace {client}", lambda client=client: sh("ip", "netns", "del", client))
        self.clients.clear()  # their veths go with their namespaces
        for rule in self._forward_rules:
            attempt(f"deleting the {rule[0]} FORWARD rule", lambda rule=rule: sh(rule[0], "-D", "FORWARD", *rule[1:]))
        self._forward_rules = []
        if Path(f"/sys/class/net/{self.bridge}").exists():
            attempt(f"deleting bridge {self.bridge}", lambda: sh("ip", "link", "del", self.bridge))
        if self._lock is not None:
            self._lock.close()  # releases the subnet
            self._lock = None
            _SUBNETS_IN_USE.discard(self.subnet)
        if errors:
            raise RuntimeError("lab teardown incomplete:\n" + "\n".join(errors))

    # --- building -------------------------------------------------------------------------------------------

    def _take_subnet(self, timeout: float = 300) -> None:
        """Claim the subnet: fail at once if another lab of this process has it, wait (up to `timeout`) while
        another test run's lab has it."""
        if self.subnet in _SUBNETS_IN_USE:
            raise RuntimeError(f"another lab of this test run is on {self.subnet}.0/24: give this one another subnet")
        lock = open(f"/run/tcprouter-lab-{self.subnet}.lock", "w")  # noqa: SIM115 (held for the lab's life)

        def claimed() -> bool:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        try:
            wait_until(claimed, timeout, 0.5, f"{self.subnet}.0/24 released by another test run's lab")
        except BaseException:
            lock.close()
            raise
        self._lock = lock
        _SUBNETS_IN_USE.add(self.subnet)

    def _create_network(self) -> None:
        if holder := sh("ip", "-o", "-4", "addr", "show", "to", f"{self.host_address}/32").split():
            raise RuntimeError(f"{self.host_address} is already on {holder[1]}: a lab of a killed test run?")
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        if self.subnet6:
            sh("ip", "addr", "add", f"{self.subnet6}1/64", "dev", self.bridge, "nodad")
        sh("ip", "link", "set", self.bridge, "up")
        # Bridge netfilter is on (Docker sets it): the host's FORWARD DROP policy would drop node-to-node frames.
        flavour = detect_flavour()
        for program in ("iptables", "ip6tables") if self.subnet6 else ("iptables",):
            rule = [f"{program}-{flavour}", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
            sh(rule[0], "-I", "FORWARD", "1", *rule[1:])
            self._forward_rules.append(rule)
        resolvers = _resolvers()
        for node in self.members:
            sh("ip", "netns", "add", node.ns)
            sh("ip", "link", "add", node.host_if, "type", "veth", "peer", "name", "eth0", "netns", node.ns)
            sh("ip", "link", "set", node.host_if, "master", self.bridge, "up")
            in_ns = ("ip", "-n", node.ns)
            self._address(node.ns, node.address, self.node_address6(node.index) if self.subnet6 else None)
            sh(*in_ns, "route", "add", "default", "via", self.host_address)
            for resolver in resolvers:  # an image pull fails at once instead of waiting ~20 s for DNS
                sh(*in_ns, "route", "add", "unreachable", f"{resolver}/32")

    def _start_engine(self, node: Node, timeout: float = 30) -> None:
        """Start node's dockerd in its namespace (nsenter --net keeps the host's cgroup mounts, which
        `ip netns exec` would hide) and wait until it answers on both listeners."""
        node.exec_root.mkdir(parents=True, exist_ok=True)
        # Not the host's /etc/docker/daemon.json, nor its /etc/docker/key.json: each engine has its own ID.
        config = node.exec_root / "daemon.json"
        config.write_text(json.dumps({"deprecated-key-path": str(node.exec_root / "key.json"), **self.daemon_config}))
        # Its own UTS namespace too, so that `docker info` and `docker node ls` name each node after its namespace.
        command = [
            "nsenter", f"--net={node.ns_path}", "unshare", "--uts",
            "sh", "-c", 'hostname "$0" && exec "$@"', node.ns,
            "dockerd",
            "--config-file", str(config),
            "--data-root", str(node.data_root),
            "--exec-root", str(node.exec_root),
            "--pidfile", str(node.pidfile),
            "-H", node.socket_url,
            "-H", node.tcp_url,
            "--tls=false",  # said explicitly, or dockerd 20.10 delays its start 15 s to warn about plain TCP
            "--bip", node.bip,
        ]  # fmt: skip
        with node.log_path.open("w") as log:
            # a new session: a Ctrl-C of the test run must not stop the engine before teardown does
            node.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (_answers(node.socket_url) and _answers(node.tcp_url)):
            if node.process.poll() is not None or time.monotonic() > deadline:
                state = f"exited {node.process.returncode}" if node.process.poll() is not None else "not answering"
                raise RuntimeError(f"dockerd of node {node.index} {state}:\n{node.log_tail()}")
            time.sleep(0.1)

    def _load_images(self) -> None:
        archive = Path(f"/tmp/{unique('tcpr-lab-images-')}.tar")
        try:
            sh("docker", "save", "-o", str(archive), BACKEND_IMAGE, *self.images)
            _each(lambda node: self.docker(node.index, "load", "-q", "-i", str(archive)), self.members)
        finally:
            archive.unlink(missing_ok=True)

    def _form_swarm(self, timeout: float = 60) -> None:
        manager = self.node(1)
        self.docker(1, "swarm", "init", "--advertise-addr", manager.address)
        token = self.docker(1, "swarm", "join-token", "-q", "worker").strip()
        join = ("swarm", "join", "--token", token, f"{manager.address}:{SWARM_PORT}")
        _each(lambda node: self.docker(node.index, *join, "--advertise-addr", node.address), self.members[1:])

        def ready() -> bool:
            states = [n["Status"]["State"] for n in self.api(1).nodes()]
            return len(states) == self.nodes and all(state == "ready" for state in states)

        wait_until(ready, timeout, 0.2, f"{self.nodes} Swarm nodes ready")

    # --- teardown -------------------------------------------------------------------------------------------

    def _stop_engine(self, node: Node, timeout: float = 30) -> None:
        """Leave the Swarm and remove the containers (at once: no stop timeouts), stop dockerd by its PID, then
        wait for its containerd to go and end whatever a killed dockerd left behind."""
        try:
            if _answers(node.socket_url):
                subprocess.run(
                    ["docker", "-H", node.socket_url, "swarm", "leave", "--force"], capture_output=True, timeout=30
                )
                client = docker.APIClient(base_url=node.socket_url, version="1.41", timeout=30)
                try:
                    for container in client.containers(all=True, quiet=True):
                        client.remove_container(container["Id"], force=True)
                finally:
                    client.close()
        finally:
            pid = self._dockerd_pid(node)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                if not self._wait_gone([pid], node, timeout):
                    os.kill(pid, signal.SIGKILL)
                    self._wait_gone([pid], node, 10)
            if not self._wait_gone(_netns_pids(node.ns_path), node, 5):
                self._kill_leftovers(node)

    def _kill_leftovers(self, node: Node) -> None:
        """What a killed dockerd leaves (its containerd dies with it): the processes of its containers, found by
        their cgroups, and the shims in the node's namespace. Kill them by PID, then remove the containers' cgroups."""
        ids = [d.name for d in (node.data_root / "containers").glob("*")]
        victims = _cgroup_pids([f"/docker/{cid}" for cid in ids]) + _netns_pids(node.ns_path)
        for pid in victims:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not self._wait_gone(victims, node, 10):
            raise RuntimeError(f"processes {victims} of node {node.index} still running after SIGKILL")
        for cid in ids:
            for cgroup in glob.glob(f"/sys/fs/cgroup/*/docker/{cid}") + glob.glob(f"/sys/fs/cgroup/docker/{cid}"):
                os.rmdir(cgroup)

    @staticmethod
    def _dockerd_pid(node: Node) -> int | None:
        """The running dockerd of `node`: the PID in its pidfile if that process is ours, else the one we started."""
        try:
            pid = int(node.pidfile.read_text())
            if f"{node.exec_root}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid):
                return pid
        except (OSError, ValueError):
            pass
        if node.process is not None and node.process.poll() is None:
            return node.process.pid
        return None

    @staticmethod
    def _wait_gone(pids: list[int], node: Node, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if node.process is not None:
                node.process.poll()  # reap our dockerd so that it does not linger as a zombie
            if not any(_alive(pid) for pid in pids):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    @staticmethod
    def _remove_dirs(node: Node) -> None:
        roots = [node.data_root, node.exec_root]
        for point in _mounts_under(roots):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                sh("umount", "--lazy", point)
        if remaining := _mounts_under(roots):
            raise RuntimeError(f"still mounted, not removing: {remaining}")
        for root in roots:
            if root.exists():
                sh("rm", "-rf", "--one-file-system", str(root))


# --- Swarm services -------------------------------------------------------------------------------------------


class Task(TypedDict):
    """A Swarm task as the manager reports it."""

    id: str
    node_id: str
    address: str  # the node's address on the lab bridge
    port: int | None  # the host-mode port published for BACKEND_PORT, once assigned
    state: str  # Status.State: "running", "starting", ...
    container_id: str | None


def create_service(
    lab: DockerLab,
    name: str,
    replicas: int,
    labels: dict[str, str],
    command: Sequence[str] = GRACEFUL_COMMAND,
    extra_args: Sequence[str] = (),
    image: str = BACKEND_IMAGE,
) -> str:
    """Create a service of backends publishing BACKEND_PORT in host mode on their nodes; its ID."""
    label_args = [arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]
    return lab.docker(
        1, "service", "create", "--no-resolve-image", "--detach", "--name", name, *label_args,
        "--publish", f"mode=host,target={BACKEND_PORT}", "--replicas", str(replicas), "--stop-grace-period", "5s",
        *extra_args, image, *command,
    ).strip()  # fmt: skip


def scale_service(lab: DockerLab, name: str, replicas: int) -> None:
    lab.docker(1, "service", "scale", "--detach", f"{name}={replicas}")


def remove_service(lab: DockerLab, name: str, timeout: float = 30) -> None:
    """Remove the service and wait until none of its containers is left on any node."""
    lab.docker(1, "service", "rm", name)
    label = f"com.docker.swarm.service.name={name}"

    def gone() -> bool:
        return all(not lab.api(i).containers(all=True, filters={"label": label}) for i in range(1, lab.nodes + 1))

    wait_until(gone, timeout, 0.2, f"containers of service {name} removed")


def node_addresses(lab: DockerLab) -> dict[str, str]:
    """Swarm node ID -> the node's address. A manager's Status.Addr may read 0.0.0.0: then the host part of
    its ManagerStatus.Addr is the address."""
    found = {}
    for node in lab.api(1).nodes():
        address = node["Status"].get("Addr", "")
        if address in ("", "0.0.0.0") and "ManagerStatus" in node:
            address = node["ManagerStatus"]["Addr"].rsplit(":", 1)[0]
        found[node["ID"]] = address
    return found


def running_tasks(lab: DockerLab, service: str) -> list[Task]:
    """The tasks of `service` whose desired state is running, whatever their current state (none once the
    service is removed)."""
    addresses = node_addresses(lab)
    try:
        listed = lab.api(1).tasks(filters={"service": service, "desired-state": "running"})
    except docker.errors.NotFound:
        return []
    tasks = []
    for task in listed:
        status = task["Status"]
        ports = (status.get("PortStatus") or {}).get("Ports") or []  # listed once per address family
        published = [p["PublishedPort"] for p in ports if p.get("TargetPort") == BACKEND_PORT]
        tasks.append(
            Task(
                id=task["ID"],
                node_id=task.get("NodeID", ""),
                address=addresses.get(task.get("NodeID", ""), ""),
                port=published[0] if published else None,
                state=status["State"],
                container_id=(status.get("ContainerStatus") or {}).get("ContainerID"),
            )
        )
    return tasks


def wait_tasks_running(
    lab: DockerLab, service: str, count: int, timeout: float = 60, answering: bool = True
) -> list[Task]:
    """Wait until `service` has exactly `count` tasks to run, all running with their port published (and, if
    `answering`, each greeting from the host); those tasks."""

    def ready() -> tuple[list[Task]] | None:  # a tuple: truthy even when `count` is 0
        tasks = running_tasks(lab, service)
        if len(tasks) != count or any(t["state"] != "running" or t["port"] is None for t in tasks):
            return None
        if answering and any(connect_outcome(None, t["address"], t["port"], 1) != "answered" for t in tasks):
            return None
        return (tasks,)

    return wait_until(ready, timeout, 0.2, f"{count} running tasks of {service}")[0]


# --- fixtures (import them into a test module) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm_lab() -> Iterator[DockerLab]:
    """A 3-node Swarm on 198.18.99.0/24 (node 1 the manager)."""
    lab = DockerLab(nodes=3, swarm=True).create()
    try:
        yield lab
    finally:
        lab.destroy()


@pytest.fixture(scope="module")
def engines_lab() -> Iterator[DockerLab]:
    """Two independent engines (no Swarm) on 198.18.98.0/24, their APIs on tcp://198.18.98.1i:2375."""
    lab = DockerLab(nodes=2, swarm=False, subnet="198.18.98").create()
    try:
        yield lab
    finally:
        lab.destroy()
