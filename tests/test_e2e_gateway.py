"""Gateway mode end to end, the seed's topology on one machine: this host is the front server of a 3-node Swarm
(and of two plain engines), each node a real Docker engine in its own network namespace behind a bridge; clients
connect from their own namespace on the public side. Real connections, real engines, no mocks."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from tcprouter.model import timestamp_ns
from tcprouter.netfilter import Flavour, Iptables

from .cluster import (
    DockerLab,
    create_service,
    node_addresses,
    remove_service,
    scale_service,
    wait_tasks_running,
)
from .support import (
    BACKEND_IMAGE,
    BACKEND_PORT,
    ClientHost,
    DockerSocketProxy,
    Load,
    Router,
    greet,
    greetings,
    in_netns,
    peers_of,
    tcprouter,
    unique,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.gateway]
FRONT = 27017


def is_rotation(answers: list[str], size: int) -> bool:
    """Exactly `size` distinct backends, then the same order over and over."""
    return len(set(answers[:size])) == size and all(a == answers[i % size] for i, a in enumerate(answers))


def greeting_of(task: dict) -> str:
    """The backend's own answer, asked directly from the host (what it says through the gateway too)."""
    return greet(task["address"], task["port"]).removeprefix("Hi from ")


def routes_exactly(client: ClientHost, expected: set[str], timeout: float = 10) -> list[str]:
    """Wait until connections through the gateway rotate exactly over `expected`; two rounds of answers."""

    def check() -> list[str] | None:
        try:
            answers = greetings(client.name, client.host_ip, FRONT, 2 * len(expected), timeout=1)
        except OSError:
            return None
        return answers if set(answers) == expected and is_rotation(answers, len(expected)) else None

    return wait_until(check, timeout, 0.05, f"an exact rotation over {sorted(expected)}")


def kernel_targets(flavour: str) -> set[str]:
    """The "address:port" of every DNAT rule of the frontend's chain in the host's kernel."""
    tables, _ = Iptables(Flavour(flavour)).read()
    rules = tables.get("nat", {}).get(f"TCPR-FE-{FRONT}", ())
    return {rule.split("--to-destination ")[1] for rule in rules if "--to-destination" in rule}


@pytest.fixture
def service(swarm_lab: DockerLab) -> Iterator[Callable[..., str]]:
    """Create labelled services of graceful backends; every one is removed after the test."""
    created: list[str] = []

    def make(replicas: int, *extra: str) -> str:
        name = unique("web")
        create_service(swarm_lab, name, replicas, {"tcp.port": str(FRONT)}, extra_args=extra)
        created.append(name)
        return name

    yield make
    for name in created:
        remove_service(swarm_lab, name)


def gateway(start_router: Callable[..., Router], lab: DockerLab, *args: str) -> Router:
    return start_router("--swarm", "--docker-url", lab.manager_url, *args)


def test_three_replicas_on_three_nodes_rotate_exactly(swarm_lab, service, start_router, client_host):
    tasks = wait_tasks_running(swarm_lab, service(3), 3)
    assert len({t["node_id"] for t in tasks}) == 3, "Swarm spreads the replicas over the 3 nodes"
    router = gateway(start_router, swarm_lab)
    expected = {greeting_of(t) for t in tasks}
    routes_exactly(client_host, expected)
    answers = greetings(client_host.name, client_host.host_ip, FRONT, 6)
    assert is_rotation(answers, 3) and set(answers) == expected  # 1,2,3,1,2,3

    nodes = {swarm_lab.node_ns(i) for i in (1, 2, 3)}  # each lab engine's host name
    report = json.loads(tcprouter("status", "--swarm", "--docker-url", swarm_lab.manager_url, "--json").stdout)
    [frontend] = report["frontends"]
    assert {b["node"] for b in frontend["backends"]} == nodes
    assert all(b["in_rotation"] and b["in_kernel"] and b["connections"] >= 2 for b in frontend["backends"])
    assert {
        f'tcprouter_backends{{family="ipv4",frontend="{FRONT}",node="{node}",protocol="tcp"}} 1.0' for node in nodes
    } <= set(router.metrics_text().splitlines())


def node_of(lab: DockerLab, task: dict) -> int:
    return next(i for i in range(1, lab.nodes + 1) if lab.node_address(i) == task["address"])


def test_masquerade_by_default_and_the_client_address_with_snat_hairpin(swarm_lab, service, start_router, client_host):
    """The seed's SNAT: the servers see the gateway's address; with --snat hairpin (for servers whose replies
    route back through the gateway, as the lab's nodes do) they see the client's."""
    [task] = wait_tasks_running(swarm_lab, service(1), 1)
    pid = swarm_lab.api(node_of(swarm_lab, task)).inspect_container(task["container_id"])["State"]["Pid"]

    def peer_seen_by_the_backend() -> list[str]:
        with socket.create_connection((client_host.host_ip, FRONT), timeout=3) as conn:
            conn.recv(64)  # the greeting: the backend holds the connection open until the client closes it
            return wait_until(lambda: peers_of(pid, BACKEND_PORT), 3, what="the backend's side of the connection")

    for args, peer in (((), swarm_lab.host_address), (("--snat", "hairpin"), client_host.client_ip)):
        router = gateway(start_router, swarm_lab, *args)
        routes_exactly(client_host, {greeting_of(task)})
        assert in_netns(client_host.name, peer_seen_by_the_backend) == [peer]
        router.stop()


def new_task_latencies(lab: DockerLab, name: str, before: set[str], flavour: str, count: int) -> list[float]:
    """Seconds from each new task's `running` timestamp (the manager's) to its DNAT rule in the kernel."""
    seen: dict[str, int] = {}  # "address:port" -> when the kernel first held it (ns)

    def all_new_routed() -> bool:
        now = time.time_ns()
        for target in kernel_targets(flavour) - before:
            seen.setdefault(target, now)
        return len(seen) >= count

    wait_until(all_new_routed, 30, 0.02, f"{count} new tasks in the kernel")
    latencies = []
    addresses = node_addresses(lab)
    for task in lab.api(1).tasks(filters={"service": name, "desired-state": "running"}):
        status = task["Status"]
        ports = (status.get("PortStatus") or {}).get("Ports") or []
        target = f"{addresses.get(task.get('NodeID', ''))}:{ports[0]['PublishedPort']}" if ports else ""
        if target in seen:
            latencies.append((seen[target] - timestamp_ns(status["Timestamp"])) / 1e9)
    return latencies


def test_scale_up_routes_new_tasks_within_1_5_s_and_scale_down_fails_no_connection(
    swarm_lab, service, start_router, client_host, host_tables
):
    name = service(3)
    tasks = wait_tasks_running(swarm_lab, name, 3)
    gateway(start_router, swarm_lab)
    routes_exactly(client_host, {greeting_of(t) for t in tasks})

    before = kernel_targets(host_tables)
    scale_service(swarm_lab, name, 6)
    latencies = new_task_latencies(swarm_lab, name, before, host_tables, 3)
    print(f"task running -> DNAT rule in the kernel: {sorted(round(x, 3) for x in latencies)} s")
    assert len(latencies) == 3 and max(latencies) <= 1.5
    six = wait_tasks_running(swarm_lab, name, 6)
    routes_exactly(client_host, {greeting_of(t) for t in six})

    load = Load(client_host.name, client_host.host_ip, FRONT, interval=0.05, limit=100_000).start()  # 20/s
    try:
        scale_service(swarm_lab, name, 1)
        [survivor] = wait_tasks_running(swarm_lab, name, 1, answering=False)
        wait_until(lambda: len(kernel_targets(host_tables)) == 1, 10, what="one backend left in the kernel")
        gone = [t for t in six if t["id"] != survivor["id"]]
        wait_until(
            lambda: all(
                not swarm_lab.api(node_of(swarm_lab, t)).containers(filters={"id": t["container_id"]}) for t in gone
            ),
            30,
            0.2,
            "the scaled-down tasks' containers to exit",
        )
    finally:
        load.stop()
    print(f"scale 6 -> 1: {len(load.outcomes)} connections, {len(load.failures)} failed")
    assert len(load.outcomes) >= 40 and load.failures == []


def test_rolling_update_start_first_fails_no_connection(swarm_lab, service, start_router, client_host):
    name = service(3)
    old = wait_tasks_running(swarm_lab, name, 3)
    for i in range(1, swarm_lab.nodes + 1):
        swarm_lab.docker(i, "tag", BACKEND_IMAGE, "tcprouter-test/backend:v2")
    gateway(start_router, swarm_lab)
    routes_exactly(client_host, {greeting_of(t) for t in old})
    load = Load(client_host.name, client_host.host_ip, FRONT, interval=0.05, limit=100_000).start()
    try:
        swarm_lab.docker(
            1, "service", "update", "--quiet", "--no-resolve-image", "--image", "tcprouter-test/backend:v2",
            "--update-order", "start-first", "--update-parallelism", "1", name, timeout=180,
        )  # fmt: skip
        new = wait_tasks_running(swarm_lab, name, 3)
        assert not {t["id"] for t in new} & {t["id"] for t in old}
        routes_exactly(client_host, {greeting_of(t) for t in new})
    finally:
        load.stop()
    print(f"rolling update: {len(load.outcomes)} connections, {len(load.failures)} failed")
    assert len(load.outcomes) >= 40 and load.failures == []


def test_a_drained_node_leaves_the_rotation_and_its_rescheduled_tasks_join(
    swarm_lab, service, start_router, client_host
):
    name = service(3)
    tasks = wait_tasks_running(swarm_lab, name, 3)
    gateway(start_router, swarm_lab)
    routes_exactly(client_host, {greeting_of(t) for t in tasks})
    node_id = next(t["node_id"] for t in tasks if t["address"] == swarm_lab.node_address(2))
    swarm_lab.docker(1, "node", "update", "--availability", "drain", node_id)
    try:
        moved = wait_until(
            lambda: (lambda ts: ts if len(ts) == 3 and node_id not in {t["node_id"] for t in ts} else None)(
                wait_tasks_running(swarm_lab, name, 3)
            ),
            60,
            0.5,
            "the tasks rescheduled off the drained node",
        )
        routes_exactly(client_host, {greeting_of(t) for t in moved})
    finally:
        swarm_lab.docker(1, "node", "update", "--availability", "active", node_id)


def test_a_node_cut_off_leaves_the_rotation_within_3_s_and_rejoins(
    swarm_lab, service, start_router, client_host, host_tables
):
    """No event tells of a cut link: the gateway's own probes take the node's backend out (2 failed probes,
    1 s apart, 0.5 s timeout), and bring it back once it answers again."""
    name = service(3)
    tasks = wait_tasks_running(swarm_lab, name, 3)
    router = gateway(start_router, swarm_lab)
    routes_exactly(client_host, {greeting_of(t) for t in tasks})
    [cut_off] = [f"{t['address']}:{t['port']}" for t in tasks if t["address"] == swarm_lab.node_address(2)]
    others = {greeting_of(t) for t in tasks if t["address"] != swarm_lab.node_address(2)}
    load = Load(client_host.name, client_host.host_ip, FRONT, interval=0.05, limit=100_000).start()
    cut = time.monotonic()
    swarm_lab.link_down(2)
    try:
        out = wait_until(
            lambda: cut_off not in kernel_targets(host_tables) and time.monotonic(), 10, 0.02, "the cut-off backend out"
        )
        routes_exactly(client_host, others, timeout=10)
        probes = [line for line in router.metrics_text().splitlines() if line.startswith("tcprouter_backend_probe_up{")]
        assert [line.endswith(" 0.0") for line in probes].count(True) == 1, probes
    finally:
        swarm_lab.link_up(2)
    load.stop()
    failing = [start - cut for start, _, error in load.outcomes if error and start >= cut]
    print(f"link cut: out of the rotation {out - cut:.2f} s after the cut; failed connections started at {failing}")
    assert out - cut <= 3.0
    assert all(start <= out for start, _, error in load.outcomes if error)  # none after it left the rotation
    assert all(answer in others for start, answer, _ in load.outcomes if start > out and answer)
    back = wait_tasks_running(swarm_lab, name, 3)
    routes_exactly(client_host, {greeting_of(t) for t in back}, timeout=15)


def test_the_gateway_killed_and_restarted_under_load_fails_no_connection(swarm_lab, service, start_router, client_host):
    tasks = wait_tasks_running(swarm_lab, service(3), 3)
    router = gateway(start_router, swarm_lab)
    routes_exactly(client_host, {greeting_of(t) for t in tasks})
    load = Load(client_host.name, client_host.host_ip, FRONT, interval=0.01, limit=100_000).start()
    try:
        wait_until(lambda: len(load.outcomes) >= 100, 10, what="load before the kill")
        router.stop(signal.SIGKILL)
        gateway(start_router, swarm_lab)
        count = len(load.outcomes)
        wait_until(lambda: len(load.outcomes) >= count + 100, 10, what="load after the restart")
    finally:
        load.stop()
    assert load.failures == [] and len(load.outcomes) >= 200


def test_the_manager_unreachable_for_30_s_keeps_routing_and_resyncs_on_return(
    swarm_lab, service, start_router, client_host
):
    name = service(3)
    tasks = wait_tasks_running(swarm_lab, name, 3)
    relay = DockerSocketProxy(upstream=swarm_lab.manager_url.removeprefix("unix://")).start()
    router = start_router("--swarm", "--docker-url", relay.url)
    routes_exactly(client_host, {greeting_of(t) for t in tasks})
    load = Load(client_host.name, client_host.host_ip, FRONT, interval=0.05, limit=100_000).start()
    try:
        relay.cut()
        wait_until(lambda: 'tcprouter_docker_connected{source="swarm"} 0.0' in router.metrics_text(), 15)
        scale_service(swarm_lab, name, 4)  # a change the gateway cannot see until the manager is back
        time.sleep(30)  # the outage itself, not a synchronisation: routing must go on all along
        outage = list(load.outcomes)
        relay.start()
        four = wait_tasks_running(swarm_lab, name, 4)
        routes_exactly(client_host, {greeting_of(t) for t in four}, timeout=10)
    finally:
        load.stop()
        relay.cut()
    print(f"manager away 30 s: {len(outage)} connections, {sum(1 for o in outage if o[2])} failed")
    assert len(outage) >= 400 and not [o for o in outage if o[2]]
    assert load.failures == []


def test_engines_mode_one_pool_across_two_engines_rotates_exactly(engines_lab, start_router, client_host):
    started: list[tuple[int, str]] = []
    try:
        for i in (1, 2):
            for _ in range(2):
                cid = engines_lab.docker(
                    i, "run", "-d", "--label", f"tcp.port={FRONT}", "-p", str(BACKEND_PORT), BACKEND_IMAGE
                ).strip()
                started.append((i, cid))
        endpoints = []
        for i, cid in started:
            port = engines_lab.api(i).inspect_container(cid)["NetworkSettings"]["Ports"][f"{BACKEND_PORT}/tcp"][0]
            endpoints.append({"address": engines_lab.node_address(i), "port": int(port["HostPort"])})
        expected = {wait_until(lambda e=e: greeting_of(e), 10, what="the engine's container") for e in endpoints}
        urls = [arg for i in (1, 2) for arg in ("--docker-url", engines_lab.engine_tcp_url(i))]
        start_router("--engines", *urls)
        answers = routes_exactly(client_host, expected)
        assert len(expected) == 4 and is_rotation(answers, 4)
        assert {a.rsplit(".", 1)[0] for a in answers} == {"172.30.1", "172.30.2"}  # both engines serve
    finally:
        for i, cid in started:
            engines_lab.docker(i, "rm", "-f", cid)
