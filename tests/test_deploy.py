"""Shipping: the router's image, compose.yml's demo pool, and the Prometheus, Grafana and systemd files in deploy/."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcprouter.metrics import Metrics, kernel_reader
from tcprouter.netfilter import Flavour

from .support import (
    REPO,
    connect_outcome,
    free_port,
    greetings,
    owned_rules_in_host,
    private_netns,
    scrape,
    sh,
    unique,
    wait_until,
)

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "tcprouter-dashboard.json"
IMAGE = "tcprouter/tcprouter:latest"
DEMO_PORT = 27017  # compose.yml's demo pool
DEMO_BACKEND_PORT = 1234
# How compose.yml runs the router; --privileged is the other way (see test_image_check_as_sidecar).
SIDECAR = ("--network", "host", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW")
DOCKER_SOCKET = ("-v", "/var/run/docker.sock:/var/run/docker.sock:ro")
# Sample names Prometheus derives from one metric family, by type (the parser names counter families without _total).
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}
NOT_TCPROUTER = {"up"}  # series Prometheus itself adds to every scrape


# ---- the image ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router_image() -> str:
    """The router's image, built here from the work tree (layer cache: seconds after the first build)."""
    sh(str(REPO / "scripts" / "demo"), "images")
    return IMAGE


def run_image(image: str, *args: str, privileged: bool = False) -> subprocess.CompletedProcess:
    options = ("--privileged", "--network", "host") if privileged else SIDECAR
    return subprocess.run(
        ["docker", "run", "--rm", *options, *DOCKER_SOCKET, image, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def privileged_containers_possible() -> bool:
    """runc gives a privileged container every capability: it cannot if this host's bounding set lacks one."""
    bounding = int(re.search(r"CapBnd:\s*([0-9a-f]+)", Path("/proc/self/status").read_text()).group(1), 16)
    every = (1 << (int(Path("/proc/sys/kernel/cap_last_cap").read_text()) + 1)) - 1
    return bounding & every == every


@pytest.mark.e2e
@pytest.mark.parametrize("privileged", [False, True], ids=["cap-add", "privileged"])
def test_image_check_as_sidecar(router_image: str, privileged: bool) -> None:
    if privileged and not privileged_containers_possible():
        pytest.skip(
            "this host's capability bounding set lacks a capability, so runc cannot start any privileged "
            "container ('unable to apply caps'); the cap-add case runs the same check"
        )
    done = run_image(router_image, "check", privileged=privileged)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok:" in done.stdout
    assert "problem" not in done.stdout


@pytest.mark.e2e
def test_image_has_both_iptables_flavours_and_runs_the_daemon_by_default(router_image: str, docker_api) -> None:
    config = docker_api.images.get(router_image).attrs["Config"]
    assert (config["Entrypoint"], config["Cmd"]) == (["tcprouter"], ["run"])
    done = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "sh", router_image, "-c",
         "iptables-nft-restore --version && iptables-legacy-restore --version && command -v gcc || true"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "nf_tables" in done.stdout and "legacy" in done.stdout
    assert "gcc" not in done.stdout  # the compiler stays in the build stage


# ---- compose.yml ----------------------------------------------------------------------------------------------------


class ComposeProject:
    """compose.yml under a unique project name, with the router's metrics on a free loopback port."""

    def __init__(self, image: str) -> None:
        self.name = unique("tcpre2e")
        self.metrics_port = free_port()
        self.env = {
            **os.environ,
            "TCPROUTER_IMAGE": image,
            "TCPROUTER_METRICS_ADDRESS": f"127.0.0.1:{self.metrics_port}",
            "TCPROUTER_LOG_LEVEL": "debug",
        }

    def compose(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            ["docker-compose", "-p", self.name, "-f", str(REPO / "compose.yml"), *args],
            capture_output=True, text=True, env=self.env, timeout=180, check=False,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def backend_ips(self, docker_api) -> list[str]:
        containers = docker_api.containers.list(
            filters={"label": [f"com.docker.compose.project={self.name}", f"tcp.port={DEMO_PORT}"]}
        )
        return [next(iter(c.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"] for c in containers]

    def metrics(self) -> str:
        return scrape(self.metrics_port)


def backends_in_rotation(metrics_text: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "tcprouter_backends" and sample.labels.get("frontend") == str(DEMO_PORT):
                return sample.value
    return 0


@pytest.mark.e2e
def test_compose_demo_rotates_then_cleanup_from_the_image_leaves_nothing(
    router_image, client_host, host_tables, docker_api
) -> None:
    project = ComposeProject(router_image)
    try:
        project.compose("up", "-d", "--no-build")
        ips = wait_until(
            lambda: len(found := project.backend_ips(docker_api)) == 3 and found, 30, 0.2, what="3 backends"
        )
        for ip in ips:
            wait_until(lambda ip=ip: connect_outcome(None, ip, DEMO_BACKEND_PORT, 1) == "answered", 20,
                       0.1, what=f"{ip} listening")  # fmt: skip
        wait_until(lambda: backends_in_rotation(project.metrics()) == 3, 30, 0.1, what="the router's rotation of 3")

        answers = greetings(client_host.name, client_host.host_ip, DEMO_PORT, 6)
        assert sorted(answers[:3]) == sorted(ips), answers
        assert answers[3:] == answers[:3], answers  # round robin: the same order again

        scraped = exported_sample_names(project.metrics())
        assert referenced_metrics() <= scraped, "referenced in deploy/ but not in the router's /metrics"
    finally:
        logs = project.compose("logs", "--no-color", "tcprouter", check=False)
        project.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)
    assert owned_rules_in_host(host_tables), f"the rules outlive the router (log: {logs[-2000:]})"
    done = run_image(router_image, "cleanup")
    assert done.returncode == 0, done.stdout + done.stderr
    assert owned_rules_in_host(host_tables) == []


def test_compose_file_is_valid_for_docker_compose_1_29() -> None:
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (scripts/setup-test-host installs it)")
    config = sh("docker-compose", "-f", str(REPO / "compose.yml"), "config")
    assert "network_mode: host" in config and "NET_ADMIN" in config
    assert config.count(f"tcp.port: '{DEMO_PORT}'") == 3


# ---- Prometheus and Grafana -----------------------------------------------------------------------------------------


def alert_exprs() -> list[str]:
    """The `expr:` of every alert (alerts.yml keeps each on one line; the count check below holds it to that)."""
    text = ALERTS.read_text()
    exprs = re.findall(r"^\s+expr:\s*(.+?)\s*$", text, re.MULTILINE)
    assert len(exprs) == len(re.findall(r"^\s+- alert:", text, re.MULTILINE))
    return exprs


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs + [re.sub(r"^label_values\((\w+),\s*\w+\)$", r"\1", v) for v in variables]


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers not followed by `(` (functions) and not label names."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_selectors = re.sub(r"\{[^}]*\}", "", without_strings)
    without_grouping = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", without_selectors)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_grouping)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", without_ranges))
    keywords = {"and", "or", "unless", "bool", "offset", "vector", "time"}
    return {n for n in names if n not in keywords and not re.fullmatch(r"[0-9e]+", n)}


def referenced_metrics() -> set[str]:
    names = set().union(*(metric_names(e) for e in alert_exprs() + dashboard_exprs()))
    return names - NOT_TCPROUTER


def exported_sample_names(metrics_text: str) -> set[str]:
    """Every sample name the router's families yield, by their declared types (also for families with no sample)."""
    return {
        family.name + suffix
        for family in text_string_to_metric_families(metrics_text)
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))
    }


def test_metric_names_in_promql_are_parsed() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, kind) (rate(tcprouter_sync_duration_seconds_bucket{instance=~"$i"}'
        "[$__rate_interval]))) or time() - max(tcprouter_last_sync_timestamp_seconds) > 300"
    )
    assert metric_names(expr) == {"tcprouter_sync_duration_seconds_bucket", "tcprouter_last_sync_timestamp_seconds"}


def test_every_alert_is_about_a_failure_the_issue_names() -> None:
    exprs = " ".join(alert_exprs())
    for needed in (
        "increase(tcprouter_sync_failures_total",
        "tcprouter_last_sync_timestamp_seconds",
        "tcprouter_docker_connected == 0",
        "tcprouter_backends == 0",
        "increase(tcprouter_drift_repairs_total",
    ):
        assert needed in exprs


@pytest.mark.kernel
def test_dashboard_and_alerts_reference_only_exported_metrics() -> None:
    """Against the registry `tcprouter run` serves, reading the (empty) tables of a private namespace."""
    from prometheus_client import generate_latest

    with private_netns() as ns:
        registry = Metrics(kernel_reader(Flavour.NFT, netns=ns)).registry
        exported = exported_sample_names(generate_latest(registry).decode())
    assert "tcprouter_backend_connections_total" in exported  # families read from the kernel are there too
    referenced = referenced_metrics()
    assert {"tcprouter_backend_connections_total", "tcprouter_sync_duration_seconds_bucket"} <= referenced
    assert referenced <= exported, f"not exported by the router: {sorted(referenced - exported)}"


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.skip("promtool is not installed (Debian package prometheus; scripts/setup-test-host installs it)")
    return path


def test_alert_rules_load_in_promtool() -> None:
    sh(promtool(), "check", "rules", str(ALERTS))


def test_alert_rules_fire_as_their_unit_tests_expect() -> None:
    sh(promtool(), "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))


def test_prometheus_config_loads_the_alert_rules() -> None:
    out = sh(promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert "1 rule files found" in out


# ---- systemd --------------------------------------------------------------------------------------------------------


def test_systemd_unit_runs_the_venv_daemon_after_docker() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "tcprouter.service")
    assert "docker.service" in unit["Unit"]["After"].split()
    service = unit["Service"]
    assert service["ExecStart"].split() == ["/opt/tcprouter/bin/tcprouter", "run"]
    assert service["Restart"] == "always"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
