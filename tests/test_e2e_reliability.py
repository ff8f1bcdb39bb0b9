"""Reliability of the control loop with a real Docker engine and the host's real tables: router restarts,
Docker going away, rules flushed by someone else, churn, health checks, draining, bad input."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcprouter import hostports
from tcprouter.compiler import Options, compile_rules
from tcprouter.diff import believed_tables, owned_only
from tcprouter.labels import LabelKeys, desired_state
from tcprouter.netfilter import Flavour, Iptables
from tcprouter.providers.docker_api import connect
from tcprouter.providers.engine import list_labelled

from .support import (
    BACKEND_IMAGE,
    REPO,
    DockerSocketProxy,
    Load,
    Router,
    connect_outcome,
    greetings,
    in_netns,
    owned_rules_in_host,
    private_netns,
    sh,
    tcprouter,
    unique,
    wait_until,
)

pytestmark = pytest.mark.e2e
FRONT = 27017
TEST_DOCKERD = str(REPO / "scripts" / "test-dockerd")


def kernel_matches_docker(flavour: str) -> bool:
    """The owned rules in the kernel are exactly those compiled from Docker's current containers."""
    state = desired_state(list_labelled(connect(None, timeout=10), LabelKeys()), "tcp", hostports.host_listeners())
    expected = believed_tables(compile_rules(state, Options(forward_parent="DOCKER-USER")))
    tables, _ = Iptables(Flavour(flavour)).read()
    return owned_only(tables) == expected


def answering(ns: str, host: str, count: int) -> set[str]:
    """The backends that answer `count` connections; empty while any of them fails."""
    try:
        return set(greetings(ns, host, FRONT, count, timeout=0.5))
    except OSError:
        return set()


def names_in_rules(flavour: str, ip: str) -> bool:
    return any(f"{ip}:" in line for line in owned_rules_in_host(flavour))


def test_router_restart_under_load_loses_no_connection(backends, start_router, client_host, host_tables):
    pool = [backends.start({"tcp.port": str(FRONT)}) for _ in range(3)]
    router = start_router()
    load = Load(client_host.name, client_host.host_ip, FRONT, interval=0.01, limit=2000).start()
    wait_until(lambda: len(load.outcomes) >= 300, 30, what="load to run")
    router.stop(signal.SIGKILL)
    wait_until(lambda: len(load.outcomes) >= 600, 30, what="load while the router is down")
    start_router()
    load.wait(60)
    assert len(load.outcomes) == 2000
    assert load.failures == []
    assert {answer for _, answer, _ in load.outcomes} == {backends.ip(c) for c in pool}
    assert kernel_matches_docker(host_tables)


def test_docker_connection_loss_and_return(backends, start_router, client_host, host_tables):
    survivor = backends.start({"tcp.port": str(FRONT)})
    doomed = backends.start({"tcp.port": str(FRONT)})
    proxy = DockerSocketProxy().start()
    try:
        router = start_router("--docker-url", proxy.url)
        proxy.cut()
        wait_until(
            lambda: 'tcprouter_docker_connected{source="local"} 0.0' in router.metrics_text(),
            10,
            what="the router to notice",
        )
        newcomer = backends.start({"tcp.port": str(FRONT)})  # started while the router cannot see Docker
        backends.remove(doomed)  # died meanwhile
        proxy.start()
        back = time.monotonic()
        new_ip, survivor_ip = backends.ip(newcomer), backends.ip(survivor)
        wait_until(
            lambda: answering(client_host.name, client_host.host_ip, 2) == {new_ip, survivor_ip},
            10,
            0.05,
            what="the pool as Docker has it now",
        )
        assert time.monotonic() - back <= 5.0
        assert 'tcprouter_docker_reconnects_total{source="local"} 1.0' in router.metrics_text()
        assert kernel_matches_docker(host_tables)
    finally:
        proxy.cut()


def test_a_container_started_between_subscribe_and_list_is_routed(backends, start_router, client_host):
    """The provider subscribes to events before it lists. A container that starts after Docker has answered
    the list (so the list lacks it) but before the provider has read that answer must come in by its start
    event: with list-then-subscribe it would be lost until the next reconnect."""
    first = backends.start({"tcp.port": str(FRONT)})
    newcomers = []
    proxy = DockerSocketProxy()
    proxy.interpose("/containers/json", lambda: newcomers.append(backends.start({"tcp.port": str(FRONT)}, wait=False)))
    proxy.start()
    try:
        router = start_router("--docker-url", proxy.url)
        assert len(newcomers) == 1
        assert "Docker connected: 1 labelled containers" in router.log()  # the list did not have it
        ips = {backends.ip(first), backends.ip(newcomers[0])}
        ns, host = client_host.name, client_host.host_ip
        wait_until(lambda: answering(ns, host, 2) == ips, 5, 0.05, what="the newcomer in the rotation")
        assert 'tcprouter_docker_reconnects_total{source="local"} 0.0' in router.metrics_text()
    finally:
        proxy.cut()


def test_a_hung_docker_daemon_is_detected_and_the_stream_reopened(backends, start_router, client_host, host_tables):
    """A daemon that keeps its connections open but answers nothing: the pings notice (within two API
    timeouts, 10 s each), the stream is closed and reopened, and once the daemon answers again what changed
    meanwhile is routed."""
    survivor = backends.start({"tcp.port": str(FRONT)})
    proxy = DockerSocketProxy().start()
    try:
        router = start_router("--docker-url", proxy.url)
        proxy.hang()
        wait_until(
            lambda: 'tcprouter_docker_connected{source="local"} 0.0' in router.metrics_text(),
            25,
            0.2,
            what="the router to notice the silence",
        )
        assert "Docker does not answer pings" in router.log()
        newcomer = backends.start({"tcp.port": str(FRONT)})  # while the daemon is hung for tcprouter
        proxy.resume()
        ips = {backends.ip(survivor), backends.ip(newcomer)}
        ns, host = client_host.name, client_host.host_ip
        wait_until(lambda: answering(ns, host, 2) == ips, 15, 0.1, what="the newcomer in the rotation")
        assert 'tcprouter_docker_connected{source="local"} 1.0' in router.metrics_text()
        assert 'tcprouter_docker_reconnects_total{source="local"} 1.0' in router.metrics_text()
        assert kernel_matches_docker(host_tables)
    finally:
        proxy.cut()


def test_docker_daemon_restart(backends, start_router, client_host, host_tables):
    """A real restart of the engine (only one that scripts/test-dockerd started, as in CI): the containers
    stop with it; the one with a restart policy comes back, the other stays dead."""
    if subprocess.run([TEST_DOCKERD, "owned"], check=False).returncode != 0:
        pytest.skip("this dockerd was not started by scripts/test-dockerd: not restarting another's daemon")
    keeper = backends.start({"tcp.port": str(FRONT)}, restart_policy={"Name": "always"}, stop_signal="SIGKILL")
    goner = backends.start({"tcp.port": str(FRONT)}, stop_signal="SIGKILL")
    goner_ip = backends.ip(goner)
    router = start_router()
    ns, host = client_host.name, client_host.host_ip
    assert answering(ns, host, 2) == {backends.ip(keeper), goner_ip}
    try:
        sh(TEST_DOCKERD, "stop")
        wait_until(
            lambda: 'tcprouter_docker_connected{source="local"} 0.0' in router.metrics_text(),
            10,
            what="the router to notice",
        )
    finally:
        sh(TEST_DOCKERD, "start")
    back = time.monotonic()
    keeper_ip = wait_until(lambda: backends.ip(keeper), 10, 0.1, what="the keeper to be restarted by Docker")
    wait_until(lambda: answering(ns, host, 3) == {keeper_ip}, 10, 0.05, what="the pool as Docker has it now")
    assert time.monotonic() - back <= 5.0
    assert not names_in_rules(host_tables, goner_ip) or goner_ip == keeper_ip
    assert kernel_matches_docker(host_tables)


@pytest.mark.parametrize(
    "vandalism",
    [
        ["-t", "nat", "-F", "TCPR-FRONTENDS"],
        ["-t", "nat", "-D", "PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "TCPR-FRONTENDS"],
        ["-t", "filter", "-F", "TCPR-FORWARD"],
    ],
    ids=["flush-dispatch", "delete-jump", "flush-forward"],
)
def test_rules_changed_behind_our_back_are_restored(backends, start_router, client_host, host_tables, vandalism):
    backends.start({"tcp.port": str(FRONT)})
    router = start_router()
    ns, host = client_host.name, client_host.host_ip
    assert connect_outcome(ns, host, FRONT) == "answered"
    assert drift_repairs(router) == 0
    sh(f"iptables-{host_tables}", *vandalism)
    broken = time.monotonic()
    wait_until(lambda: connect_outcome(ns, host, FRONT, 0.3) == "answered", 10, 0.05, what="routing to come back")
    assert time.monotonic() - broken <= 2.0
    assert kernel_matches_docker(host_tables)
    assert drift_repairs(router) == 1  # counted with the write that repaired it, once


def drift_repairs(router) -> float:
    families = text_string_to_metric_families(router.metrics_text())
    return next(s.value for f in families for s in f.samples if s.name == "tcprouter_drift_repairs_total")


def test_an_edit_inside_a_frontend_chain_is_repaired_by_the_periodic_resync(backends, start_router, host_tables):
    """The cheap drift check skips the frontend chains (tests/test_sync.py): the full resync every
    --resync-interval is what repairs them."""
    for _ in range(2):
        backends.start({"tcp.port": str(FRONT)})
    router = start_router("--resync-interval", "1")
    wait_until(lambda: kernel_matches_docker(host_tables), 5, what="the pool in the kernel")
    assert drift_repairs(router) == 0
    sh(f"iptables-{host_tables}", "-t", "nat", "-D", f"TCPR-FE-{FRONT}", "2")  # the first backend's slot
    # Counted only by a full sync that found the edit (nothing else changes here): a resync repaired it.
    wait_until(lambda: drift_repairs(router) == 1, 10, 0.05, what="the next full resync to repair the edit")
    assert kernel_matches_docker(host_tables)


@pytest.mark.parametrize("table", ["nat", "filter"])
def test_a_deleted_canary_makes_the_daemon_repair_everything(backends, start_router, client_host, host_tables, table):
    """A frontend chain is not looked at by the drift check (only at the full resync, here an hour away); the
    disappearance of either table's TCPR-CANARY (what a table flush or a firewall reload leaves) triggers a
    full resync at the next check, which repairs the frontend chain too."""
    backends.start({"tcp.port": str(FRONT)})
    router = start_router("--resync-interval", "3600")
    ns, host = client_host.name, client_host.host_ip
    assert connect_outcome(ns, host, FRONT) == "answered"
    sh(f"iptables-{host_tables}", "-t", "nat", "-F", f"TCPR-FE-{FRONT}")
    assert connect_outcome(ns, host, FRONT, 0.3) == "refused"  # nothing DNATs: the host itself refuses
    sh(f"iptables-{host_tables}", "-t", table, "-X", "TCPR-CANARY")
    broken = time.monotonic()
    wait_until(lambda: connect_outcome(ns, host, FRONT, 0.3) == "answered", 10, 0.05, what="routing to come back")
    assert time.monotonic() - broken <= 2.0
    assert f"drift: {table} chain TCPR-CANARY was changed" in router.log()
    assert kernel_matches_docker(host_tables)


@pytest.mark.parametrize("table", ["nat", "filter"])
def test_a_whole_table_replaced_is_rebuilt(backends, flavour, table):
    """A firewall reload that replaces a whole table (iptables-restore without --noflush) takes every owned
    chain and hook with it: the daemon rebuilds them all at the next drift check. Run in a private namespace
    (the host's tables hold Docker's rules), on this test's own label prefix."""
    prefix = unique("tcpr")
    for _ in range(2):
        backends.start({f"{prefix}.port": str(FRONT)}, wait=False)
    with private_netns() as ns:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        iptables = Iptables(Flavour(flavour), netns=ns)
        router = Router("--label-prefix", prefix, "--flavour", flavour, "--resync-interval", "3600", netns=ns)
        try:
            router.start()
            written = owned_only(iptables.read()[0])
            assert len(written["nat"][f"TCPR-FE-{FRONT}"]) == 4  # mark, two slots, a backend's own connection
            sh("ip", "netns", "exec", ns, f"iptables-{flavour}-restore", input=f"*{table}\nCOMMIT\n")
            assert table not in owned_only(iptables.read()[0])
            replaced = time.monotonic()
            wait_until(lambda: owned_only(iptables.read()[0]) == written, 10, 0.05, what="the owned rules rebuilt")
            assert time.monotonic() - replaced <= 2.0
            assert "drift:" in router.log()
        finally:
            router.stop()


def test_churn_never_routes_to_a_removed_backend_and_leaks_nothing(
    backends, start_router, client_host, host_tables, docker_api
):
    stable = {backends.ip(backends.start({"tcp.port": str(FRONT)})) for _ in range(2)}
    start_router()
    baseline = owned_rules_in_host(host_tables)
    load = Load(client_host.name, client_host.host_ip, FRONT, interval=0.005, limit=1_000_000).start()
    # Docker reuses addresses, so a churned backend is identified by its address and its lifetime:
    # from just before `docker run` to the moment its last rule was seen gone from the kernel.
    lifetimes: list[tuple[str, float, float]] = []
    churned = []
    with ThreadPoolExecutor(8) as stopper:
        try:
            for _ in range(200):
                born = time.monotonic()
                container = docker_api.containers.run(BACKEND_IMAGE, detach=True, labels={"tcp.port": str(FRONT)})
                churned.append(container)
                container.reload()
                ip = container.attrs["NetworkSettings"]["IPAddress"]
                wait_until(lambda ip=ip: names_in_rules(host_tables, ip), 5, 0.01, what="the new backend's rule")
                # PID 1 ignores SIGTERM: the container lives ~1 s after its removal from the rotation.
                stopper.submit(container.stop, timeout=1)
                wait_until(lambda ip=ip: not names_in_rules(host_tables, ip), 5, 0.005, what="the rule to go")
                lifetimes.append((ip, born, time.monotonic()))
        finally:
            load.stop()
            for container in churned:
                container.remove(force=True)

    def owner(started: float, ip: str) -> int | None:
        return next(
            (i for i, (addr, born, gone) in enumerate(lifetimes) if addr == ip and born <= started <= gone), None
        )

    churned_answers = [(t, ip) for t, ip, _ in load.outcomes if ip and ip not in stable]
    late = [(t, ip) for t, ip in churned_answers if owner(t, ip) is None]
    assert late == []  # no connection reached a backend after its removal was written
    served = {owner(t, ip) for t, ip in churned_answers}
    assert len(served) >= 150  # the churned backends did take connections while they were in the pool
    with contextlib.suppress(AssertionError):
        wait_until(lambda: owned_rules_in_host(host_tables) == baseline, 10, what="owned rules back to baseline")
    assert owned_rules_in_host(host_tables) == baseline  # (a failure shows the difference)
    assert kernel_matches_docker(host_tables)


def test_unhealthy_backend_leaves_and_rejoins(backends, start_router, client_host):
    check = {"test": ["CMD-SHELL", "test ! -f /sick"], "interval": 300_000_000, "retries": 1}
    steady = backends.start({"tcp.port": str(FRONT)})
    patient = backends.start({"tcp.port": str(FRONT)}, healthcheck=check)
    start_router()
    ns, host, ips = client_host.name, client_host.host_ip, {backends.ip(steady), backends.ip(patient)}
    wait_until(lambda: answering(ns, host, 2) == ips, 10, 0.1, what="the healthy pool")
    name = patient.get_wrapped_container().name
    sh("docker", "exec", name, "touch", "/sick")
    wait_until(lambda: answering(ns, host, 4) == {backends.ip(steady)}, 10, 0.1, what="it to leave")
    sh("docker", "exec", name, "rm", "/sick")
    wait_until(lambda: answering(ns, host, 2) == ips, 10, 0.1, what="it to rejoin")


def test_stop_drains_new_connections_while_established_ones_continue(backends, start_router, client_host, host_tables):
    first, second = (backends.start({"tcp.port": str(FRONT)}) for _ in range(2))
    start_router()
    ns, host = client_host.name, client_host.host_ip
    first_ip, second_ip = backends.ip(first), backends.ip(second)
    # A socket belongs to the namespace it was created in, whichever thread uses it later.
    with in_netns(ns, lambda: socket.create_connection((host, FRONT), timeout=5)) as held:
        reader = held.makefile("r")
        assert reader.readline().strip() == f"Hi from {first_ip}"
        stopping = threading.Thread(target=first.get_wrapped_container().stop, kwargs={"timeout": 4})
        stopping.start()
        wait_until(lambda: not names_in_rules(host_tables, first_ip), 2, 0.01, what="first out of the rotation")
        assert greetings(ns, host, FRONT, 4) == [second_ip] * 4
        held.sendall(b"still there?\n")
        assert reader.readline().strip() == "still there?"  # the established connection carries on
        stopping.join(10)


def test_stop_drains_a_backend_whose_stop_signal_is_sigquit(backends, start_router, client_host, host_tables):
    """nginx's image stops on SIGQUIT: `docker stop` sends it (the kill event carries 3), and the backend takes 3 s
    to exit. It must leave the rotation when the signal is sent, not when the process is gone."""
    quitting = backends.start(
        {"tcp.port": str(FRONT)},
        command=["sh", "-c", "trap 'sleep 3; exit 0' QUIT; nc -ll -p 1234 -e /bin/hi & wait"],
        stop_signal="SIGQUIT",
    )
    other = backends.start({"tcp.port": str(FRONT)})
    start_router()
    ns, host = client_host.name, client_host.host_ip
    quitting_ip, other_ip = backends.ip(quitting), backends.ip(other)
    assert set(greetings(ns, host, FRONT, 2)) == {quitting_ip, other_ip}
    stopping = threading.Thread(target=quitting.get_wrapped_container().stop, kwargs={"timeout": 10})
    called = time.monotonic()
    stopping.start()
    wait_until(lambda: not names_in_rules(host_tables, quitting_ip), 1, 0.01, what="the quitting backend out")
    print(f"SIGQUIT backend out of the rotation {time.monotonic() - called:.3f} s after docker stop was called")
    assert greetings(ns, host, FRONT, 6) == [other_ip] * 6
    quitting.get_wrapped_container().reload()
    assert quitting.get_wrapped_container().status == "running"  # still shutting down: drained, not gone
    stopping.join(15)


def dnat_packets(flavour: str) -> int:
    """Connections counted by the frontend's DNAT rules: a chain rewritten by iptables-restore starts again at 0."""
    saved = sh(f"iptables-{flavour}-save", "-c", "-t", "nat")
    rules = [line for line in saved.splitlines() if f"TCPR-FE-{FRONT} " in line and "DNAT" in line]
    return sum(int(line[1:].split(":")[0]) for line in rules)


def test_a_second_instance_and_cleanup_refuse_while_the_owner_runs_and_touch_nothing(
    backends, start_router, client_host, host_tables
):
    pool = [backends.start({"tcp.port": str(FRONT)}) for _ in range(2)]
    start_router()
    before = owned_rules_in_host(host_tables)
    second = tcprouter("run", "--metrics-address", "", check=False)
    assert second.returncode == 3, second.stdout + second.stderr
    said = second.stdout + second.stderr
    assert "another tcprouter owns this host's tables" in said and "--standby" in said
    cleanup = tcprouter("cleanup", check=False)
    assert cleanup.returncode == 1 and "stop it first" in cleanup.stderr, cleanup.stderr
    assert owned_rules_in_host(host_tables) == before
    answers = greetings(client_host.name, client_host.host_ip, FRONT, 4)
    assert sorted(answers) == sorted([backends.ip(c) for c in pool] * 2)


def test_a_standby_follows_docker_and_takes_over_within_2_s_without_rewriting_the_rules(
    backends, start_router, client_host, host_tables
):
    pool = [backends.start({"tcp.port": str(FRONT)}) for _ in range(2)]
    owner = start_router()
    standby = start_router("--standby")
    assert standby.standing_by() and "standby" in standby.log()
    pool.append(backends.start({"tcp.port": str(FRONT)}))  # the owner routes it; the standby only follows
    ips = {backends.ip(c) for c in pool}
    wait_until(lambda: set(greetings(client_host.name, client_host.host_ip, FRONT, 3)) == ips, 10, what="3 backends")
    load = Load(client_host.name, client_host.host_ip, FRONT, interval=0.01, limit=100_000).start()
    try:
        wait_until(lambda: len(load.outcomes) >= 200, 30, what="load to run")
        counted = dnat_packets(host_tables)
        assert not standby.synced(), "a standby writes nothing"
        owner.stop(signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: "tcprouter_leader 1.0" in standby.metrics_text().splitlines(), 2, 0.01, "the takeover")
        wait_until(standby.synced, 2, 0.01, "the standby's first sync")
        took_over = time.monotonic() - killed
        assert dnat_packets(host_tables) >= counted > 0, "the rules in force were rewritten (counters restarted)"
        wait_until(lambda: len(load.outcomes) >= 600, 30, what="load after the takeover")
    finally:
        load.stop()
    print(f"standby took over and synced {took_over:.3f} s after the owner was killed")
    assert load.failures == []
    assert took_over < 2.0
    leaving = pool.pop()  # the new owner follows Docker (without load: this backend does not drain gracefully)
    rest = ips - {backends.ip(leaving)}
    leaving.stop()
    wait_until(lambda: answering(client_host.name, client_host.host_ip, 4) == rest, 5, what="the pool without it")


def test_bad_labels_and_port_conflicts_leave_the_rest_working(backends, start_router, client_host, host_tables):
    good = backends.start({"tcp.port": str(FRONT)})
    backends.start({"tcp.port": "not-a-port"}, wait=False)
    with socket.create_server(("0.0.0.0", 0)) as listener:
        busy = listener.getsockname()[1]
        squatter = backends.start({"tcp.port": str(busy)})
        router = start_router()
        assert greetings(client_host.name, client_host.host_ip, FRONT, 2) == [backends.ip(good)] * 2
        log = router.log()
        assert "label tcp.port='not-a-port' is not an integer" in log
        assert f"{squatter.get_wrapped_container().name}" in log and "already listens" in log
        assert not any(f"--dport {busy} " in line for line in owned_rules_in_host(host_tables))


class CountingApi:
    """A real Docker API client that counts its container inspects."""

    def __init__(self, api) -> None:
        self.api, self.inspected, self.lock = api, [], threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.api, name)

    def inspect_container(self, container_id: str) -> dict:
        with self.lock:
            self.inspected.append(container_id)
        return self.api.inspect_container(container_id)


def test_a_relist_inspects_only_the_containers_whose_list_entries_changed(backends, docker_api):
    """Real containers: Docker's list entries agree with what their inspects gave (labels, state, health,
    addresses; the labels tcprouter reads), so a relist holding those snapshots inspects none; a container on a
    new network, or seen stopping, is inspected again."""
    prefix = unique("relist")
    check = {"test": ["CMD-SHELL", "true"], "interval": 300_000_000}
    # A label tcprouter does not read, as Compose and images add them: left out of the snapshots, not compared.
    plain = [backends.start({f"{prefix}.port": "80", "org.example.build": "42"}, wait=False) for _ in range(2)]
    healthy = backends.start({f"{prefix}.port": "80"}, wait=False, healthcheck=check)
    wrapped = healthy.get_wrapped_container()
    wait_until(lambda: wrapped.reload() or wrapped.attrs["State"]["Health"]["Status"] == "healthy", 10)
    api = CountingApi(connect(None, timeout=10))
    first = list_labelled(api, LabelKeys(prefix))
    assert len(first) == 3 and len(api.inspected) == 3
    assert not any("org.example.build" in s.labels for s in first)
    assert {s.health for s in first} == {None, "healthy"}
    held = {s.id: s for s in first}
    api.inspected.clear()
    assert list_labelled(api, LabelKeys(prefix), held=held) == first and api.inspected == []
    moved = plain[0].get_wrapped_container()
    network = docker_api.networks.create(unique("tcpr-relist-"))
    try:
        network.connect(moved.id)
        again = list_labelled(api, LabelKeys(prefix), held=held)
        assert api.inspected == [moved.id]
        assert network.name in next(s for s in again if s.id == moved.id).networks
        api.inspected.clear()
        list_labelled(
            api, LabelKeys(prefix), held={s.id: s for s in again}, suspect={plain[1].get_wrapped_container().id}
        )
        assert api.inspected == [plain[1].get_wrapped_container().id]
    finally:
        network.disconnect(moved.id, force=True)
        network.remove()
