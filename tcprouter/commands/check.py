"""`tcprouter check`: preflight. Each finding is (ok, what an operator reads)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ..netfilter import Flavour, NetfilterError, docker_chains_in, flavours_on_path
from ..providers.docker_api import connect

Finding = tuple[bool, str]
CAP_NET_ADMIN = 12


def has_net_admin(proc_status: str) -> bool:
    """Whether CAP_NET_ADMIN is in the effective set, from the text of /proc/<pid>/status."""
    for line in proc_status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return False


def privilege_finding(euid: int, net_admin: bool) -> Finding:
    if net_admin:
        return True, f"{'root' if euid == 0 else f'uid {euid}'} with the CAP_NET_ADMIN capability"
    if euid == 0:
        return False, (
            "running as root but without the CAP_NET_ADMIN capability, so iptables rules cannot be changed "
            "(in a container: add --cap-add NET_ADMIN)"
        )
    return False, (
        f"not root (uid {euid}) and without the CAP_NET_ADMIN capability, so iptables rules cannot be changed: "
        "run tcprouter as root"
    )


def forwarding_finding(ip_forward: str) -> Finding:
    if ip_forward.strip() == "1":
        return True, "IP forwarding is on (net.ipv4.ip_forward = 1)"
    return False, (
        "IP forwarding is off (net.ipv4.ip_forward = 0): the kernel would drop every routed connection; "
        "turn it on with `sysctl -w net.ipv4.ip_forward=1`"
    )


def _root_cause(error: BaseException) -> BaseException:
    """The OS error behind a Docker client error (docker, requests and urllib3 wrap it several levels deep)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current
        nested = (current.__cause__, current.__context__, *current.args)
        pending += [e for e in nested if isinstance(e, BaseException)]
    return error


def docker_problem(url: str, error: BaseException) -> str:
    cause = _root_cause(error)
    where = f"Docker is unreachable at {url}"
    if isinstance(cause, FileNotFoundError):
        return f"{where}: the socket does not exist (is dockerd running? in a container, mount /var/run/docker.sock)"
    if isinstance(cause, PermissionError):
        return f"{where}: permission denied on the socket (run as root or as a member of the docker group)"
    if isinstance(cause, ConnectionRefusedError):
        return f"{where}: connection refused (is dockerd running?)"
    return f"{where}: {cause}"


def docker_urls(args: argparse.Namespace) -> list[str]:
    return args.docker_url or [os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"]


def docker_findings(args: argparse.Namespace) -> list[Finding]:
    findings = []
    for url in docker_urls(args):
        try:
            info = connect(url, timeout=5).version()
        except Exception as error:
            findings.append((False, docker_problem(url, error)))
            continue
        findings.append(
            (True, f"Docker {info.get('Version', '?')} reachable at {url} (API {info.get('ApiVersion', '?')})")
        )
    return findings


def iptables_findings(
    available: Sequence[Flavour],
    docker_in: Sequence[Flavour],
    unreadable: dict[Flavour, str],
    forced: Flavour | None,
    docker_reachable: bool,
) -> list[Finding]:
    """Whether tcprouter can write its rules where Docker's are: both must use the same iptables flavour.

    `available`: flavours whose binaries are on PATH; `docker_in`: those whose tables hold Docker's chains.
    """
    if not available:
        problem = "no iptables binaries on PATH (neither iptables-nft-restore nor iptables-legacy-restore)"
        return [(False, f"{problem}: install the iptables package")]
    findings: list[Finding] = [(False, f"cannot read the {f} tables: {error}") for f, error in unreadable.items()]
    missing = [f for f in Flavour if f not in available]
    if forced is not None and forced not in available:
        findings.append((False, f"--flavour {forced} was asked but iptables-{forced}-restore is not on PATH"))
    elif forced is not None and docker_in and forced not in docker_in:
        where = f"--flavour {forced} was asked but Docker's rules are in the {docker_in[0]} tables"
        findings.append((False, f"{where}: rules written there would not work with Docker's (use --flavour auto)"))
    elif docker_in:
        chosen = forced or docker_in[0]
        findings.append((True, f"Docker's rules are in the {docker_in[0]} tables; writing with iptables-{chosen}"))
    elif docker_reachable and missing and not unreadable:
        where = f"Docker's rules are in none of the tables that the iptables binaries on PATH read ({available[0]})"
        findings.append((False, f"{where}: Docker probably uses iptables-{missing[0]}, which is not on PATH"))
    elif not unreadable:
        found = "iptables-" + ", iptables-".join(available)
        findings.append((True, f"{found} on PATH; no Docker chains in their tables (dockerd --iptables=false?)"))
    return findings


def _iptables_findings(args: argparse.Namespace, docker_reachable: bool) -> list[Finding]:
    available = flavours_on_path()
    docker_in, unreadable = [], {}
    for flavour in available:
        try:
            if docker_chains_in(flavour):
                docker_in.append(flavour)
        except NetfilterError as error:
            unreadable[flavour] = str(error)
    forced = None if args.flavour == "auto" else Flavour(args.flavour)
    return iptables_findings(available, docker_in, unreadable, forced, docker_reachable)


def command(args: argparse.Namespace) -> int:
    """Preflight: print every finding, each problem in plain words; exit 1 if there is any problem."""
    with open("/proc/self/status") as status, open("/proc/sys/net/ipv4/ip_forward") as ip_forward:
        findings = [
            privilege_finding(os.geteuid(), has_net_admin(status.read())),
            forwarding_finding(ip_forward.read()),
        ]
    docker = docker_findings(args)
    findings += [*docker, *_iptables_findings(args, docker_reachable=all(ok for ok, _ in docker))]
    for ok, text in findings:
        print(f"{'ok' if ok else 'problem'}: {text}")
    problems = sum(not ok for ok, _ in findings)
    if problems:
        print(f"{problems} problem{'s' if problems > 1 else ''}: tcprouter cannot route connections on this host")
    return 1 if problems else 0
