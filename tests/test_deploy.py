"""Shipping: the router's image, compose.yml's demo pool, the Swarm stack and gateway files, and the Prometheus,
Grafana and systemd files in deploy/."""

from __future__ import annotations

import configparser
import fcntl
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tcprouter import cli
from tcprouter.daemon import Mode, resolve_mode
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
STACK = DEPLOY / "swarm" / "stack.yml"
GATEWAY_COMPOSE = DEPLOY / "gateway.compose.yml"
GATEWAY_UNIT = DEPLOY / "systemd" / "tcprouter-gateway.service"
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
# Exported only once a gateway probes remote backends: a local router serves them as families without samples.
GATEWAY_METRICS = {"tcprouter_backend_probe_up", "tcprouter_backend_probe_failures_total"}


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
def test_image_has_both_iptables_flavours_nft_and_runs_the_daemon_by_default(router_image: str, docker_api) -> None:
    config = docker_api.images.get(router_image).attrs["Config"]
    assert (config["Entrypoint"], config["Cmd"]) == (["tcprouter"], ["run"])
    done = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "sh", router_image, "-c",
         "iptables-nft-restore --version && iptables-legacy-restore --version && nft --version && conntrack --version"
         " && command -v gcc || true"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "nf_tables" in done.stdout and "legacy" in done.stdout
    assert "nftables v" in done.stdout and "conntrack v" in done.stdout  # --nat nftables, the flows of drained backends
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
            labels = sample.labels
            if sample.name == "tcprouter_backends" and (labels.get("frontend"), labels.get("family")) == (
                str(DEMO_PORT),
                "ipv4",
            ):
                return sample.value
    return 0


def assert_shares_the_hosts_xtables_lock(container) -> None:
    """While this host's /run/xtables.lock is held, the container's iptables-legacy cannot take its lock: they are
    one lock (what keeps a legacy host's dockerd and the router from committing over each other)."""
    lock_check = ["iptables-legacy", "-w", "1", "-t", "nat", "-S", "POSTROUTING"]
    with open("/run/xtables.lock", "a") as lock:  # created as iptables-legacy itself would
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = container.exec_run(lock_check)
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert held.exit_code == 4 and b"holding the xtables lock" in held.output, held.output
    free = container.exec_run(lock_check)
    assert free.exit_code == 0, free.output


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

        [router] = docker_api.containers.list(
            filters={"label": [f"com.docker.compose.project={project.name}", "com.docker.compose.service=tcprouter"]}
        )
        health = lambda: router.reload() or router.attrs["State"]["Health"]["Status"]  # noqa: E731
        assert wait_until(lambda: health() != "starting" and health(), 60, 0.5, "the image's HEALTHCHECK") == "healthy"
        assert_shares_the_hosts_xtables_lock(router)
    finally:
        logs = project.compose("logs", "--no-color", "tcprouter", check=False)
        project.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)
    assert owned_rules_in_host(host_tables), f"the rules outlive the router (log: {logs[-2000:]})"
    done = run_image(router_image, "cleanup")
    assert done.returncode == 0, done.stdout + done.stderr
    assert owned_rules_in_host(host_tables) == []


def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if not path:
        pytest.skip("docker-compose is not installed (scripts/setup-test-host installs it)")
    return path


def test_compose_file_is_valid_for_docker_compose_1_29() -> None:
    config = sh(docker_compose(), "-f", str(REPO / "compose.yml"), "config")
    assert "network_mode: host" in config and "NET_ADMIN" in config
    assert config.count(f"tcp.port: '{DEMO_PORT}'") == 3


# ---- Swarm stack and gateway (several hosts) ------------------------------------------------------------------------


def stack_config(loader: str) -> str:
    """deploy/swarm/stack.yml as a Compose loader reads, validates and prints it (default variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCPROUTER_")}
    if loader == "docker stack config":  # the Swarm CLI's own loader (Docker CLI 23.0+)
        docker = shutil.which("docker")
        if not docker or subprocess.run([docker, "stack", "config", "--help"], capture_output=True).returncode:
            pytest.skip("this Docker CLI has no `docker stack config` (23.0 and later)")
        command = [docker, "stack", "config", "-c", str(STACK)]
    else:
        command = [docker_compose(), "-f", str(STACK), "config"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def yaml_list(config: str, key: str) -> list[str]:
    """The items of the block list under `key:` in a loader's normalised output (one scalar item a line)."""
    match = re.search(rf"^( *){re.escape(key)}:\n((?:\1 *- .*\n)+)", config, re.MULTILINE)
    assert match, f"no list under {key!r} in:\n{config}"
    return [item.strip().removeprefix("- ") for item in match.group(2).splitlines()]


@pytest.mark.parametrize("loader", ["docker stack config", "docker-compose config"])
def test_swarm_stack_runs_the_router_with_swarm_on_the_host_network(loader: str) -> None:
    config = stack_config(loader)
    service = re.search(r"^  tcprouter:\n((?:    .*\n)+)", config, re.MULTILINE)
    assert service, config
    router = service.group(0)
    assert yaml_list(router, "command") == ["run", "--swarm"]
    assert yaml_list(router, "cap_add") == ["NET_ADMIN", "NET_RAW"]
    assert yaml_list(router, "constraints") == ["node.role == manager", "node.labels.tcprouter.edge == true"]
    assert re.search(r"^    networks:\n      host: null$", router, re.MULTILINE), router
    assert re.search(r"^      mode: global$", router, re.MULTILINE), router
    assert "/var/run/docker.sock" in router and "TCPROUTER_METRICS_ADDRESS: 127.0.0.1:9105" in router
    assert "image: tcprouter/tcprouter:latest" in router
    networks = re.search(r"^networks:\n((?:  .*\n)+)", config, re.MULTILINE)  # the top-level section
    assert networks, config
    assert {"host:", "external: true", "name: host"} <= {line.strip() for line in networks.group(1).splitlines()}
    # The example pool: service labels and a host-mode port, as the router's --swarm provider reads them.
    assert re.search(r"""tcp\.port: ['"]27017['"]""", config)
    assert re.search(r"- (mode: host\s+target: 1234|target: 1234\s+mode: host)\n", config), config


def test_swarm_stack_avoids_what_docker_20_10_stack_deploy_ignores_or_refuses() -> None:
    text = STACK.read_text()
    # Docker 20.10's loader reads a file without `version` as 1.0, which it refuses.
    assert re.search(r"""^version: ["']3\.\d+["']""", text, re.MULTILINE)
    # Ignored by stack deploy ("Ignoring unsupported options"): the router would run without the host's network.
    ignored = re.findall(r"^ +(build|network_mode|privileged|restart|security_opt|devices):", text, re.MULTILINE)
    assert ignored == []


def test_the_deploy_files_configure_the_gateway_the_cli_expects(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's command and the gateway files' TCPROUTER_* variables, through the real argument parser."""
    for name in [k for k in os.environ if k.startswith("TCPROUTER_")]:
        monkeypatch.delenv(name)
    args = cli.parse_args(["run", "--swarm"])
    assert resolve_mode(args.provider, args.docker_url) is Mode.SWARM and args.docker_url == []
    monkeypatch.setenv("TCPROUTER_PROVIDER", "swarm")
    monkeypatch.setenv("TCPROUTER_DOCKER_URL", "tcp://manager:2376")
    args = cli.parse_args(["run"])
    assert (resolve_mode(args.provider, args.docker_url), args.docker_url) == (Mode.SWARM, ["tcp://manager:2376"])
    monkeypatch.setenv("TCPROUTER_PROVIDER", "engines")  # the alternative the gateway files document
    monkeypatch.setenv("TCPROUTER_DOCKER_URL", "tcp://node1:2376 tcp://node2:2376")
    args = cli.parse_args(["run"])
    assert resolve_mode(args.provider, args.docker_url) is Mode.ENGINES
    assert args.docker_url == ["tcp://node1:2376", "tcp://node2:2376"]


def test_gateway_compose_file_is_valid_for_docker_compose_1_29() -> None:
    compose = docker_compose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCPROUTER_")}
    missing = subprocess.run([compose, "-f", str(GATEWAY_COMPOSE), "config"], capture_output=True, text=True,
                             env=env, timeout=60, check=False)  # fmt: skip
    assert missing.returncode != 0 and "TCPROUTER_DOCKER_URL" in missing.stderr  # the manager's URL is required
    env["TCPROUTER_DOCKER_URL"] = "tcp://manager.example:2376"
    config = subprocess.run([compose, "-f", str(GATEWAY_COMPOSE), "config"], capture_output=True, text=True,
                            env=env, timeout=60, check=True).stdout  # fmt: skip
    assert "network_mode: host" in config and yaml_list(config, "cap_add") == ["NET_ADMIN", "NET_RAW"]
    for setting in ("TCPROUTER_PROVIDER: swarm", "TCPROUTER_DOCKER_URL: tcp://manager.example:2376",
                    "DOCKER_TLS_VERIFY: '1'", "DOCKER_CERT_PATH: /etc/tcprouter/docker-tls"):  # fmt: skip
        assert setting in config
    assert ":/etc/tcprouter/docker-tls:ro" in config


# ---- Prometheus and Grafana -----------------------------------------------------------------------------------------


def alert_exprs() -> list[str]:
    """The `expr:` of every alert (alerts.yml keeps each on one line; the count check below holds it to that)."""
    text = ALERTS.read_text()
    exprs = re.findall(r"^\s+expr:\s*(.+?)\s*$", text, re.MULTILINE)
    assert len(exprs) == len(re.findall(r"^\s+- alert:", text, re.MULTILINE))
    return exprs


def dashboard_panels() -> list[dict]:
    """Every panel but rows, also those inside a collapsed row."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    inside = [child for panel in panels for child in panel.get("panels", [])]
    return [panel for panel in panels + inside if panel["type"] != "row"]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
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


def alerts_by_name() -> dict[str, tuple[str, str | None]]:
    """alert name -> (expr, `for` duration or None)."""
    rules = re.split(r"^\s+- alert:\s*", ALERTS.read_text(), flags=re.MULTILINE)[1:]
    found = {}
    for rule in rules:
        name = rule.split()[0]
        expr = re.search(r"^\s+expr:\s*(.+?)\s*$", rule, re.MULTILINE)
        duration = re.search(r"^\s+for:\s*(\S+)", rule, re.MULTILINE)
        assert expr, name
        found[name] = (expr.group(1), duration.group(1) if duration else None)
    return found


def test_every_alert_is_about_a_failure_the_issue_names() -> None:
    alerts = alerts_by_name()
    assert len(alerts) == len(alert_exprs())
    for name, needed in {
        "TcprouterSyncFailing": "increase(tcprouter_sync_failures_total[",
        "TcprouterSyncStale": "time() - tcprouter_last_sync_timestamp_seconds >",
        "TcprouterRulesDrift": "increase(tcprouter_drift_repairs_total[",
    }.items():
        assert needed in alerts[name][0], name
    # Per source (local, swarm, an engine's URL): each lost source alerts on its own.
    assert alerts["TcprouterDockerDisconnected"] == ("tcprouter_docker_connected == 0", "1m")
    # tcprouter_backends has a series per node: a frontend is empty only when all its nodes' backends are gone.
    assert alerts["TcprouterFrontendWithoutBackends"] == (
        "sum by (instance, protocol, frontend) (tcprouter_backends) == 0",
        "2m",
    )
    # Gateway mode: a node whose every backend fails the gateway's probes.
    node_down = ("max by (instance, node) (tcprouter_backend_probe_up) == 0", "1m")
    assert alerts["TcprouterNodeUnreachable"] == node_down


def registry_sample_names() -> set[str]:
    """Every sample name the router's Metrics registry can serve, gateway-only families included (it registers
    them in every mode; a local router serves them without samples). The kernel reader reads empty tables."""
    return exported_sample_names(generate_latest(Metrics(lambda: ({}, [])).registry).decode())


def test_dashboard_and_alerts_reference_only_metrics_the_router_registers() -> None:
    registered = registry_sample_names()
    assert registered >= GATEWAY_METRICS
    assert {"tcprouter_rules", "tcprouter_backend_connections_total"} <= registered  # the kernel-read families too
    referenced = referenced_metrics()
    assert referenced >= GATEWAY_METRICS, "the Nodes panels and TcprouterNodeUnreachable use them"
    assert referenced <= registered, f"not registered by the router: {sorted(referenced - registered)}"


def test_dashboard_shows_each_node_with_its_probe_state() -> None:
    panels = {panel["title"]: panel for panel in dashboard_panels()}
    probes = panels["Probe state per node"]
    assert [target["expr"] for target in probes["targets"]] == [
        'min by (node) (tcprouter_backend_probe_up{instance=~"$instance"})'
    ]
    (mapping,) = probes["fieldConfig"]["defaults"]["mappings"]
    shown = {value: (option["text"], option["color"]) for value, option in mapping["options"].items()}
    assert shown == {"0": ("DOWN", "red"), "1": ("up", "green")}
    per_node = {
        title: panels[title]["targets"][0]["expr"] for title in ("Backends per node", "Probe failures per node")
    }
    assert "sum by (node) (tcprouter_backends{" in per_node["Backends per node"]
    assert "sum by (node) (rate(tcprouter_backend_probe_failures_total{" in per_node["Probe failures per node"]
    docker_api = " ".join(target["expr"] for target in panels["Docker API per source"]["targets"])
    assert "by (source) (tcprouter_docker_connected" in docker_api


@pytest.mark.kernel
def test_dashboard_and_alerts_reference_only_exported_metrics() -> None:
    """Against the registry `tcprouter run` serves, reading the (empty) tables of a private namespace."""
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


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Section.Key -> every value of that key, in order (a unit may repeat a key, as Environment=)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith(("#", ";")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def test_gateway_unit_runs_the_swarm_provider_from_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = unit_settings(GATEWAY_UNIT)
    assert "docker.service" not in " ".join(unit["Unit.After"])  # a front server needs no Docker engine
    assert "network-online.target" in unit["Unit.After"][0].split()
    assert unit["Service.Restart"] == ["always"] and unit["Install.WantedBy"] == ["multi-user.target"]
    # Required (no "-"): it holds the manager's URL.
    assert unit["Service.EnvironmentFile"] == ["/etc/default/tcprouter-gateway"]
    (exec_start,) = unit["Service.ExecStart"]
    program, *argv = exec_start.split()
    assert program == "/opt/tcprouter/bin/tcprouter" and argv == ["run"]
    environment = dict(item.split("=", 1) for line in unit["Service.Environment"] for item in line.split())
    assert environment["DOCKER_TLS_VERIFY"] == "1" and environment["DOCKER_CERT_PATH"] == "/etc/tcprouter/docker-tls"
    assert "TCPROUTER_DOCKER_URL" not in environment
    for name in [k for k in os.environ if k.startswith(("TCPROUTER_", "DOCKER_"))]:
        monkeypatch.delenv(name)
    for name, value in {**environment, "TCPROUTER_DOCKER_URL": "tcp://manager:2376"}.items():
        monkeypatch.setenv(name, value)
    args = cli.parse_args(argv)
    assert resolve_mode(args.provider, args.docker_url) is Mode.SWARM
    assert args.docker_url == ["tcp://manager:2376"] and args.metrics_address == "127.0.0.1:9105"
