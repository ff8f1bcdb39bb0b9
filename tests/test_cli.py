"""The command line: status and check as pure functions, logging, and `tcprouter check` in each broken
condition a test can put it in without harming the host (a missing socket, a private network namespace with
forwarding off, a PATH without iptables, another uid, a dropped capability)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import urllib3.exceptions
from docker.errors import DockerException

from tcprouter import cli
from tcprouter.commands import check as preflight
from tcprouter.commands import status
from tcprouter.compiler import compile_rules
from tcprouter.diff import parse_save
from tcprouter.labels import desired_state
from tcprouter.logs import JsonFormatter
from tcprouter.model import ContainerSnapshot, timestamp_ns
from tcprouter.netfilter import Flavour

from .support import REPO, private_netns, sh, unique

NFT, LEGACY = Flavour.NFT, Flavour.LEGACY


def snapshot(name: str, ip: str, created: str, health: str | None = None, **labels: str) -> ContainerSnapshot:
    return ContainerSnapshot(
        id=name.ljust(64, "0"),
        name=name,
        created=timestamp_ns(created),
        labels={"tcp.port": "27017", **labels},
        running=True,
        health=health,
        networks={"bridge": ip},
        subnets={"bridge": "172.17.0.0/16"},
    )


CONTAINERS = [
    snapshot("web-a", "172.17.0.2", "2026-01-01T00:00:01Z"),
    snapshot("web-b", "172.17.0.3", "2026-01-01T00:00:02Z", health="healthy"),
    snapshot("web-c", "172.17.0.4", "2026-01-01T00:00:03Z", health="unhealthy"),
    snapshot("bad", "172.17.0.5", "2026-01-01T00:00:04Z", **{"tcp.port": "http"}),
]


def kernel_for(containers: list[ContainerSnapshot], packets: list[int]) -> list:
    """What the kernel holds after tcprouter wrote the rules for `containers`, DNAT rule i having counted packets[i]."""
    chain = compile_rules(desired_state(containers)).chains["nat"]["TCPR-FE-27017"]
    lines = ["*nat", ":TCPR-FE-27017 - [0:0]"]
    dnats = iter(packets)
    lines += [f"[{next(dnats) if 'DNAT' in r else 0}:0] -A TCPR-FE-27017 {r}" for r in chain]
    return parse_save("\n".join([*lines, "COMMIT", ""]))[1]


def test_status_lists_every_valid_container_with_health_rotation_kernel_and_connections():
    report = status.status_report(CONTAINERS, kernel_for(CONTAINERS, [5, 4, 1]), "tcp")  # a, b, fallback (-s b -> a)
    [frontend] = report["frontends"]
    assert (frontend["port"], frontend["balance"]) == (27017, "roundrobin")
    rows = {b["container"]: b for b in frontend["backends"]}
    assert list(rows) == ["web-a", "web-b", "web-c"]
    assert rows["web-a"] == {
        "container": "web-a",
        "id": "web-a0000000",
        "node": "",
        "family": "ipv4",
        "address": "172.17.0.2:27017",
        "health": "none",
        "weight": 1,
        "in_rotation": True,
        "in_kernel": True,
        "connections": 6,
    }
    assert (rows["web-b"]["health"], rows["web-b"]["in_rotation"], rows["web-b"]["connections"]) == ("healthy", True, 4)
    assert (rows["web-c"]["health"], rows["web-c"]["in_rotation"], rows["web-c"]["in_kernel"]) == (
        "unhealthy",
        False,
        False,
    )
    [rejected] = report["rejected"]
    assert (rejected["container"], rejected["reason"]) == ("bad", "invalid_port")
    assert "tcp.port" in rejected["detail"]


def test_status_tells_a_backend_that_docker_runs_but_the_kernel_does_not_route():
    report = status.status_report(CONTAINERS, kernel_for(CONTAINERS[:1], [2]), "tcp")  # rules from before web-b started
    rows = {b["container"]: (b["in_rotation"], b["in_kernel"]) for b in report["frontends"][0]["backends"]}
    assert rows == {"web-a": (True, True), "web-b": (True, False), "web-c": (False, False)}


def test_status_table_for_humans():
    text = status.render_status(status.status_report(CONTAINERS, kernel_for(CONTAINERS, [5, 4, 1]), "tcp"))
    lines = text.splitlines()
    assert lines[0].split() == [
        "FRONTEND", "BALANCE", "CONTAINER", "NODE", "FAMILY", "ADDRESS", "HEALTH", "WEIGHT", "IN", "ROTATION", "IN",
        "KERNEL", "CONNECTIONS",
    ]  # fmt: skip
    assert lines[1].split() == [
        ":27017",
        "roundrobin",
        "web-a",
        "-",
        "ipv4",
        "172.17.0.2:27017",
        "none",
        "1",
        "yes",
        "yes",
        "6",
    ]
    assert lines[3].split() == ["web-c", "-", "ipv4", "172.17.0.4:27017", "unhealthy", "1", "no", "no", "0"]
    assert lines[5].split()[:3] == ["REJECTED", "CONTAINER", "REASON"]
    assert lines[6].split()[:2] == ["bad", "invalid_port"]
    assert status.render_status(status.status_report([], [], "tcp")).startswith("no frontends")


def test_net_admin_is_bit_12_of_the_effective_set():
    assert preflight.has_net_admin("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert not preflight.has_net_admin("CapEff:\t000001ffffffefff\n")
    assert preflight.has_net_admin("CapEff:\t0000000000001000\n")
    assert not preflight.has_net_admin("CapEff:\t0000000000000000\n")


def test_privilege_findings():
    assert preflight.privilege_finding(0, True)[0]
    assert preflight.privilege_finding(1000, True)[0]  # a non-root user with NET_ADMIN may write rules
    ok, text = preflight.privilege_finding(0, False)
    assert not ok and "without the CAP_NET_ADMIN capability" in text
    ok, text = preflight.privilege_finding(65534, False)
    assert not ok and text.startswith("not root (uid 65534)")


def test_forwarding_finding():
    assert preflight.forwarding_finding("1\n")[0]
    ok, text = preflight.forwarding_finding("0\n")
    assert not ok and "IP forwarding is off" in text


@pytest.mark.parametrize(
    ("cause", "words"),
    [
        (FileNotFoundError(2, "No such file or directory"), "the socket does not exist"),
        (PermissionError(13, "Permission denied"), "permission denied"),
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    ],
)
def test_docker_problem_names_the_cause_under_the_client_wrappers(cause: OSError, words: str):
    def wrapped() -> None:  # what docker-py raises: DockerException from requests from urllib3 from the OS
        try:
            try:
                raise requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.", cause))
            except requests.ConnectionError as error:
                raise DockerException(f"Error while fetching server API version: {error}") from error
        except DockerException as error:
            return preflight.docker_problem("unix:///x.sock", error)

    assert wrapped().startswith(f"Docker is unreachable at unix:///x.sock: {words}")


@pytest.mark.parametrize(
    ("available", "docker_in", "forced", "ok", "words"),
    [
        ([NFT, LEGACY], [NFT], None, True, "Docker's rules are in the nft tables; writing with iptables-nft"),
        ([], [], None, False, "no iptables binaries on PATH"),
        ([LEGACY], [], None, False, "Docker probably uses iptables-nft, which is not on PATH"),
        ([NFT, LEGACY], [], None, True, "no Docker chains"),
        ([NFT, LEGACY], [NFT], LEGACY, False, "--flavour legacy was asked but Docker's rules are in the nft tables"),
        ([NFT], [NFT], LEGACY, False, "--flavour legacy was asked but iptables-legacy-restore is not on PATH"),
    ],
)
def test_iptables_findings(available, docker_in, forced, ok: bool, words: str):
    [(found_ok, text)] = preflight.iptables_findings(available, docker_in, {}, forced, docker_reachable=True)
    assert found_ok == ok and words in text


def test_unreadable_tables_are_a_problem():
    findings = preflight.iptables_findings([NFT], [], {NFT: "Permission denied (you must be root)"}, None, True)
    assert findings == [(False, "cannot read the nft tables: Permission denied (you must be root)")]


def test_json_log_lines_carry_level_message_and_extra_fields():
    record = logging.LogRecord("tcprouter.sync", logging.INFO, __file__, 1, "frontend %d: +backend %s", (80, "a"), None)
    record.frontend = 80
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "info" and entry["message"] == "frontend 80: +backend a" and entry["frontend"] == 80


def test_log_level_must_be_a_known_level(capsys: pytest.CaptureFixture[str]):
    assert cli.parse_args(["status", "--log-level", "WARNING"], {}).log_level == "warning"
    with pytest.raises(SystemExit):
        cli.parse_args(["status", "--log-level", "verbose"], {})
    assert "invalid choice" in capsys.readouterr().err


# ---- `tcprouter check` for real: each broken condition, one at a time ---------------------------------


def check(*args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `tcprouter check`; its exit code and the problems it printed."""
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "tcprouter", "check", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=60,
    )
    problems = [line.removeprefix("problem: ") for line in done.stdout.splitlines() if line.startswith("problem: ")]
    assert (done.returncode != 0) == bool(problems), done.stdout + done.stderr
    return done.returncode, problems


@pytest.mark.e2e
def test_check_passes_on_this_host():
    assert check() == (0, [])


@pytest.mark.e2e
def test_check_docker_unreachable():
    socket = f"/tmp/{unique('no-docker-')}.sock"
    assert check("--docker-url", f"unix://{socket}") == (
        1,
        [
            f"Docker is unreachable at unix://{socket}: the socket does not exist "
            "(is dockerd running? in a container, mount /var/run/docker.sock)"
        ],
    )


@pytest.mark.e2e
def test_check_ip_forward_off():
    with private_netns() as ns:
        # A new namespace copies the host's IPv4 settings (net.core.devconf_inherit_init_net = 0 means "inherit"
        # for IPv4), so forwarding is on in it here; turn it off in the namespace only.
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        code, problems = check(prefix=("ip", "netns", "exec", ns))  # Docker's unix socket works across namespaces
    assert code == 1
    assert problems == [
        "IP forwarding is off (net.ipv4.ip_forward = 0): the kernel would drop every routed connection; "
        "turn it on with `sysctl -w net.ipv4.ip_forward=1`"
    ]


@pytest.mark.e2e
def test_check_no_iptables_binaries(tmp_path: Path):
    assert check(env={"PATH": str(tmp_path)}) == (
        1,
        ["no iptables binaries on PATH (neither iptables-nft-restore nor iptables-legacy-restore): "
         "install the iptables package"],
    )  # fmt: skip


@pytest.mark.e2e
def test_check_only_the_other_flavours_binaries(tmp_path: Path, flavour: str):
    other = next(f for f in Flavour if f != flavour)
    for tool in ("save", "restore"):
        (tmp_path / f"iptables-{other}-{tool}").symlink_to(f"/usr/sbin/iptables-{other}-{tool}")
    code, problems = check(env={"PATH": str(tmp_path)})
    assert code == 1
    assert problems == [
        f"Docker's rules are in none of the tables that the iptables binaries on PATH read ({other}): "
        f"Docker probably uses iptables-{flavour}, which is not on PATH"
    ]


@pytest.mark.e2e
def test_check_flavour_asked_is_not_dockers(flavour: str):
    other = next(f for f in Flavour if f != flavour)
    code, problems = check("--flavour", other)
    assert code == 1
    assert problems == [
        f"--flavour {other} was asked but Docker's rules are in the {flavour} tables: "
        "rules written there would not work with Docker's (use --flavour auto)"
    ]


@pytest.mark.e2e
def test_check_not_root():
    code, problems = check(prefix=("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"))
    assert code == 1
    assert problems[0] == (
        "not root (uid 65534) and without the CAP_NET_ADMIN capability, so iptables rules cannot be changed: "
        "run tcprouter as root"
    )
    assert any("permission denied on the socket" in p for p in problems)


@pytest.mark.e2e
def test_check_root_without_net_admin():
    code, problems = check(prefix=("setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"))
    assert code == 1
    assert problems[0] == (
        "running as root but without the CAP_NET_ADMIN capability, so iptables rules cannot be changed "
        "(in a container: add --cap-add NET_ADMIN)"
    )


def test_status_reports_a_frontend_refused_for_a_host_listener():
    used = {27017: "a host process already listens on 0.0.0.0:27017"}
    report = status.status_report(CONTAINERS[:1], [], "tcp", busy_ports=used)
    assert report["frontends"] == []
    assert [(r["container"], r["reason"]) for r in report["rejected"]] == [("web-a", "port_in_use")]


def test_docker_urls_on_the_command_line_replace_the_variables_list():
    environ = {"TCPROUTER_DOCKER_URL": "tcp://a:2376, tcp://b:2376"}
    assert cli.parse_args(["run"], environ).docker_url == ["tcp://a:2376", "tcp://b:2376"]
    flags = ["run", "--docker-url", "tcp://a:2376", "--docker-url", "tcp://c:2376"]
    assert cli.parse_args(flags, environ).docker_url == ["tcp://a:2376", "tcp://c:2376"]
