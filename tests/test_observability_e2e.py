"""Observability end to end: /metrics, `tcprouter status` and the daemon's logs against real containers,
the real kernel tables and real connections from a client namespace."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcprouter.diff import owned_only
from tcprouter.netfilter import Flavour, Iptables

from .support import greetings, private_netns, sh, tcprouter, wait_until

pytestmark = pytest.mark.e2e
FRONT = 27017
SECOND = 1000_000_000  # Docker durations are in nanoseconds
# HEALTHCHECK whose first probe is a minute away: the container stays "starting", out of the rotation.
STARTING = {"test": ["CMD-SHELL", "true"], "interval": 60 * SECOND}


def scrape(router) -> dict:
    """family name -> the family, from the daemon's /metrics parsed by prometheus-client's own parser."""
    return {family.name: family for family in text_string_to_metric_families(router.metrics_text())}


def values(family, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of one family (the `_total`, `_count`... sample when a suffix is given) by their sorted labels."""
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == family.name + suffix}


def name(container) -> str:
    return container.get_wrapped_container().name


def kernel_pool(flavour: str, port: int = FRONT) -> dict[str, tuple[str, int]]:
    """backend name -> (DNAT target, packets), summed over its rules, read straight from `iptables-save -c`."""
    found: dict[str, tuple[str, int]] = {}
    rule = re.compile(rf'^\[(\d+):\d+\] -A TCPR-FE-{port} .*--comment "?([^"\s]+)"? .*-j DNAT --to-destination (\S+)$')
    for line in sh(f"iptables-{flavour}-save", "-c", "-t", "nat").splitlines():
        if match := rule.match(line):
            packets, backend, target = int(match[1]), match[2], match[3]
            found[backend] = (target, found.get(backend, (target, 0))[1] + packets)
    return found


def test_metrics_every_family_with_its_labels_and_exact_connection_counts(backends, start_router, client_host):
    first = [backends.start({"tcp.port": str(FRONT)}) for _ in range(2)]
    rejected = backends.start({"tcp.port": "not-a-port"}, wait=False)
    router = start_router()
    third = backends.start({"tcp.port": str(FRONT)})  # after the start: a Docker event, measured to the kernel
    tcp_pool = {(("family", "ipv4"), ("frontend", str(FRONT)), ("node", ""), ("protocol", "tcp")): 3}

    def ipv4_backends() -> dict:  # (the host's containers have no IPv6 address: the IPv6 row is at 0)
        return {k: v for k, v in values(scrape(router)["tcprouter_backends"]).items() if ("family", "ipv4") in k}

    wait_until(lambda: ipv4_backends() == tcp_pool, 5)

    answers = greetings(client_host.name, client_host.host_ip, FRONT, 9)
    ips = [backends.ip(c) for c in [*first, third]]
    assert Counter(answers) == {ip: 3 for ip in ips}

    metrics = scrape(router)
    assert values(metrics["tcprouter_backend_connections"], "_total") == {
        (("backend", name(c)), ("family", "ipv4"), ("frontend", str(FRONT)), ("protocol", "tcp")): 3
        for c in [*first, third]
    }
    assert metrics["tcprouter_backend_connections"].type == "counter"
    assert values(metrics["tcprouter_frontends"]) == {(("protocol", "tcp"),): 1, (("protocol", "udp"),): 0}
    assert values(metrics["tcprouter_rejected_containers"]) == {(("reason", "invalid_port"),): 1}
    assert name(rejected) not in {dict(k).get("backend") for k in values(metrics["tcprouter_backend_connections"])}
    rules = values(metrics["tcprouter_rules"])
    fe_chain = (("chain", f"TCPR-FE-{FRONT}"), ("family", "ipv4"), ("table", "nat"))
    assert rules[fe_chain] == 5  # CONNMARK, 3 slots, fallback
    assert {dict(k)["table"] for k in rules} == {"nat", "filter"}

    sync = metrics["tcprouter_sync_duration_seconds"]
    assert sync.type == "histogram"
    assert {dict(k)["kind"] for k in values(sync, "_count")} == {"full", "partial"}
    assert values(sync, "_count")[(("kind", "full"),)] >= 1  # the first sync
    assert values(sync, "_count")[(("kind", "partial"),)] >= 1  # the third backend
    latency = metrics["tcprouter_event_to_rules_seconds"]
    assert latency.type == "histogram" and values(latency, "_count")[()] >= 1
    assert 0 < values(latency, "_sum")[()] < 1.0 * values(latency, "_count")[()]
    assert values(metrics["tcprouter_docker_events"], "_total")[(("action", "start"),)] >= 1
    assert values(metrics["tcprouter_sync_failures"], "_total") == {(): 0}
    assert abs(values(metrics["tcprouter_last_sync_timestamp_seconds"])[()] - time.time()) < 120
    assert values(metrics["tcprouter_docker_connected"]) == {(("source", "local"),): 1}
    assert values(metrics["tcprouter_docker_reconnects"], "_total") == {(("source", "local"),): 0}
    [(labels, one)] = values(metrics["tcprouter_build_info"]).items()
    assert one == 1 and [key for key, _ in labels] == ["version"]
    assert values(metrics["tcprouter_internal_errors"], "_total") == {}  # no thread met an unexpected error

    health = tcprouter("health", "--metrics-address", f"127.0.0.1:{router.metrics_port}", check=False)
    assert (health.returncode, health.stdout.strip()) == (0, "ok")  # the image's HEALTHCHECK
    router.stop()
    health = tcprouter("health", "--metrics-address", f"127.0.0.1:{router.metrics_port}", check=False)
    assert health.returncode == 1 and "no answer" in health.stdout


def test_rule_counts_equal_iptables_save(backends, start_router, flavour):
    for port in (FRONT, 1883, 1883):
        backends.start({"tcp.port": str(port)})
    router = start_router()
    saved: Counter[tuple[str, str]] = Counter()
    table = ""
    for line in sh(f"iptables-{flavour}-save").splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":TCPR-"):
            saved[(table, line[1:].split()[0])] += 0  # an empty owned chain counts too
        elif line.startswith("-A TCPR-"):
            saved[(table, line.split()[1])] += 1
    rules = values(scrape(router)["tcprouter_rules"]).items()
    metric = {(dict(k)["table"], dict(k)["chain"]): v for k, v in rules if dict(k)["family"] == "ipv4"}
    assert metric == dict(saved)
    assert metric[("nat", "TCPR-FE-1883")] == 4 and metric[("nat", "TCPR-FRONTENDS")] == 2


@pytest.mark.parametrize("flags", [(), ("--snat", "always")], ids=["default", "snat-always"])
def test_render_loads_with_restore_and_equals_what_run_writes(backends, start_router, flavour, flags):
    """`tcprouter render` prints a script that iptables-restore (of Docker's flavour) accepts, and that, loaded
    into an empty namespace with Docker's DOCKER-USER chain, gives exactly the owned rules `run` wrote here."""
    backends.start({"tcp.port": str(FRONT)})
    backends.start({"tcp.port": str(FRONT), "tcp.weight": "2"})
    backends.start({"tcp.port": "1883", "tcp.balance": "random"})
    start_router(*flags)
    script = tcprouter("render", *flags).stdout
    written, _ = Iptables(Flavour(flavour)).read()
    with private_netns() as ns:
        rendered = Iptables(Flavour(flavour), netns=ns)
        rendered.restore("*filter\n:DOCKER-USER - [0:0]\nCOMMIT\n")
        rendered.restore(script, test=True)
        rendered.restore(script)
        loaded, _ = rendered.read()
    assert owned_only(loaded) == owned_only(written)
    assert "TCPR-FE-1883" in owned_only(written)["nat"]


def test_status_json_matches_the_kernel_and_docker(backends, start_router, client_host, docker_api, flavour):
    pool = [backends.start({"tcp.port": str(FRONT)}) for _ in range(3)]
    starting = backends.start({"tcp.port": str(FRONT)}, healthcheck=STARTING)
    bad = backends.start({"tcp.port": str(FRONT), "tcp.weight": "heavy"}, wait=False)
    start_router()
    greetings(client_host.name, client_host.host_ip, FRONT, 9)

    report = json.loads(tcprouter("status", "--json").stdout)
    kernel = kernel_pool(flavour)
    [frontend] = report["frontends"]
    assert (frontend["port"], frontend["balance"]) == (FRONT, "roundrobin")
    rows = {b["container"]: b for b in frontend["backends"]}
    assert list(rows) == [name(c) for c in [*pool, starting]]  # rotation order: oldest first
    for container in pool:
        docker_view = docker_api.containers.get(container.get_wrapped_container().id)
        address = f"{docker_view.attrs['NetworkSettings']['IPAddress']}:1234"
        row = rows[docker_view.name]
        assert (row["address"], row["id"], row["health"]) == (address, docker_view.id[:12], "none")
        assert row["in_rotation"] and row["in_kernel"]
        assert kernel[docker_view.name] == (address, row["connections"])
        assert row["connections"] == 3
    waiting = rows[name(starting)]
    assert (waiting["health"], waiting["in_rotation"], waiting["in_kernel"], waiting["connections"]) == (
        "starting",
        False,
        False,
        0,
    )
    assert name(starting) not in kernel and len(kernel) == 3
    assert report["rejected"] == [
        {
            "container": name(bad),
            "id": bad.get_wrapped_container().id[:12],
            "reason": "invalid_weight",
            "detail": "label tcp.weight='heavy' is not an integer 1-100",
        }
    ]

    table = tcprouter("status").stdout
    assert re.search(rf"{name(pool[0])}\s+-\s+ipv4\s+\S+:1234\s+none\s+1\s+yes\s+yes\s+3\n", table), table
    assert re.search(rf"{name(starting)}\s+-\s+ipv4\s+\S+:1234\s+starting\s+1\s+no\s+no\s+0\n", table), table
    assert re.search(rf"{name(bad)}\s+invalid_weight\s+label tcp.weight='heavy'", table), table


def test_json_logs_one_line_per_change(backends, start_router):
    router = start_router("--log-format", "json")
    container = backends.start({"tcp.port": str(FRONT)})
    change = rf"frontend {FRONT}: %sbackend {name(container)} \S+:1234 \((start|resync|kill|die|stop|destroy)\)"
    # A start and a kill inside one batching window are coalesced (no line at all): let the start land first.
    wait_until(lambda: re.search(change % r"\+", router.log()), 5, what="the +backend log line")
    backends.remove(container)
    wait_until(lambda: re.search(change % "-", router.log()), 5, what="the -backend log line")
    entries = json_lines(router.log())
    assert all({"level", "message", "time", "logger"} <= entry.keys() for entry in entries)
    assert {"debug", "info"} <= {entry["level"] for entry in entries}  # the fixture runs --log-level debug
    changes = [e["message"] for e in entries if re.match(rf"frontend {FRONT}: [+-]backend", e["message"])]
    assert len(changes) == 2, changes  # one line per change
    assert re.fullmatch(change % r"\+", changes[0]) and re.fullmatch(change % "-", changes[1]), changes


def json_lines(output: str) -> list[dict]:
    """Every line of the daemon's output, parsed as JSON (a line that is not JSON fails, naming it)."""
    entries = []
    for line in output.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return entries


def test_log_level_warning_hides_info(backends, start_router):
    backends.start({"tcp.port": "0"}, wait=False)
    router = start_router("--log-format", "json", "--log-level", "warning")
    entries = json_lines(router.log())
    assert entries and {entry["level"] for entry in entries} <= {"warning", "error"}
    assert any("tcp.port='0'" in entry["message"] for entry in entries)  # the rejection is a warning
