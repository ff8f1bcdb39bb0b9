"""Command line: `tcprouter run | status | render | cleanup | check | health`.

Every flag can also be given as an environment variable TCPROUTER_<FLAG> (dashes as underscores),
which is how the sidecar container is configured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence

import docker.errors

from . import hostports
from .compiler import DEFAULT_MARK_BIT, FRONTEND_CHAIN_PREFIX, Options, RuleSet, compile_rules
from .daemon import EXIT_TABLES_OWNED, Mode, build_providers, claim_tables, resolve_mode, serve
from .diff import SavedRule, restore_script
from .labels import desired_state, parse_backend
from .metrics import Metrics, backend_connections, kernel_reader
from .model import ContainerSnapshot
from .netfilter import (
    Flavour,
    Iptables,
    NetfilterError,
    Writer,
    detect_flavour,
    enable_route_localnet,
    holds_docker_chains,
)
from .ownership import TablesLock
from .probe import ProbePolicy
from .providers.docker_api import connect
from .runner import Timing

log = logging.getLogger("tcprouter")
LOG_LEVELS = ("debug", "info", "warning", "error")
WRITERS = ("auto", "restore", "iptc")
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra=` fields of the call."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((key, value) for key, value in vars(record).items() if key not in _RECORD_ATTRIBUTES)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _env(flag: str, default: str | None) -> str | None:
    return os.environ.get("TCPROUTER_" + flag.upper().replace("-", "_"), default)


class _UrlList(argparse.Action):
    """A repeatable flag whose first use on the command line replaces the list its variable gave, rather than
    adding to it (argparse's "append" would keep TCPROUTER_DOCKER_URL's URL and add the same one again)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values, option=None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*([] if current is self.default else current), values])


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--label-prefix", default=_env("label-prefix", "tcp"), help="label namespace (default tcp)")
    common.add_argument(
        "--docker-url",
        action=_UrlList,
        default=(_env("docker-url", "") or "").replace(",", " ").split(),
        help="Docker API address (default: DOCKER_HOST or the local socket); once per engine with --engines; "
        "TLS from DOCKER_TLS_VERIFY and DOCKER_CERT_PATH as the Docker CLI reads them; ssh://user@host works too",
    )
    modes = common.add_mutually_exclusive_group()
    modes.set_defaults(provider=_env("provider", None))
    modes.add_argument(
        "--swarm",
        dest="provider",
        action="store_const",
        const=str(Mode.SWARM),
        help="gateway mode: route to the running tasks of services labelled <prefix>.port, at their node's "
        "address and host-mode published port (--docker-url: a manager)",
    )
    modes.add_argument(
        "--engines",
        dest="provider",
        action="store_const",
        const=str(Mode.ENGINES),
        help="gateway mode: route to labelled containers of other hosts' engines (--docker-url once per engine), "
        "at the engine host's address and the container's published port (implied by several --docker-url)",
    )
    common.add_argument(
        "--flavour",
        choices=["auto", *Flavour],
        default=_env("flavour", "auto"),
        help="iptables flavour to write: auto follows Docker's",
    )
    common.add_argument(
        "--writer",
        choices=WRITERS,
        default=_env("writer", "auto"),
        help="restore: pipe the rules into iptables-<flavour>-restore; iptc: write them in-process with "
        "python-iptables (libiptc, legacy hosts only); auto: restore (the faster one, see scripts/bench-writers)",
    )
    common.add_argument(
        "--listen-address",
        default=_env("listen-address", None),
        help="route only connections to this host address (default: every local address)",
    )
    common.add_argument(
        "--snat",
        choices=["auto", "hairpin", "always"],
        default=_env("snat", "auto"),
        help="hairpin: masquerade only hairpin flows (backends see client addresses); always: every flow (backends "
        "whose replies do not route back through this host); auto: always in gateway mode, else hairpin",
    )
    common.add_argument(
        "--route-localhost",
        action="store_true",
        default=_env("route-localhost", "") in ("1", "true", "yes"),
        help="also route 127.0.0.1:<port> from the host (sets net.ipv4.conf.all.route_localnet=1, "
        "and drops martian packets to 127.0.0.0/8)",
    )
    common.add_argument(
        "--mark-bit",
        type=lambda v: int(v, 0),
        default=_env("mark-bit", hex(DEFAULT_MARK_BIT)),
        help="the conntrack mark bit that tags routed connections (default 0x100000)",
    )
    common.add_argument("--log-format", choices=["human", "json"], default=_env("log-format", "human"))
    common.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default=_env("log-level", "info"))

    parser = argparse.ArgumentParser(prog="tcprouter", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    metrics = argparse.ArgumentParser(add_help=False)
    metrics.add_argument(
        "--metrics-address",
        default=_env("metrics-address", ":9105"),
        help="host:port of the Prometheus endpoint, /metrics and /healthz ('' to disable)",
    )
    run = commands.add_parser(
        "run", parents=[common, metrics], help="the daemon: follow Docker, keep the rules in step"
    )
    run.add_argument(
        "--standby",
        action="store_true",
        default=_env("standby", "") in ("1", "true", "yes"),
        help="when another tcprouter owns this host's tables, wait as a hot standby and take over when it stops "
        f"(without it, exit with status {EXIT_TABLES_OWNED})",
    )
    run.add_argument(
        "--resync-interval",
        type=float,
        default=float(_env("resync-interval", "60")),
        help="seconds between full resyncs against the kernel",
    )
    run.add_argument(
        "--check-interval",
        type=float,
        default=float(_env("check-interval", "1")),
        help="seconds between drift checks of the hooks and top-level chains",
    )
    run.add_argument(
        "--swarm-poll-interval",
        type=float,
        default=float(_env("swarm-poll-interval", "0.5")),
        help="seconds between task listings of the Swarm manager (also listed on every service or node event)",
    )
    run.add_argument(
        "--probe-interval",
        type=float,
        default=float(_env("probe-interval", "1")),
        help="seconds between TCP probes of each remote backend (gateway mode)",
    )
    run.add_argument(
        "--probe-timeout",
        type=float,
        default=float(_env("probe-timeout", "0.5")),
        help="seconds a probe's TCP connect may take",
    )
    run.add_argument(
        "--probe-fall",
        type=int,
        default=int(_env("probe-fall", "2")),
        help="failed probes in a row that take a remote backend out of the rotation",
    )
    run.add_argument(
        "--probe-rise",
        type=int,
        default=int(_env("probe-rise", "1")),
        help="successful probes in a row that bring it back",
    )
    status = commands.add_parser("status", parents=[common], help="frontends, backends, connections, rejections")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser("render", parents=[common], help="print the rules for Docker's current state, write nothing")
    commands.add_parser("cleanup", parents=[common], help="remove every rule and chain tcprouter owns")
    commands.add_parser("check", parents=[common], help="preflight: privileges, forwarding, iptables, Docker")
    commands.add_parser(
        "health",
        parents=[common, metrics],
        help="ask the daemon's /healthz (the image's HEALTHCHECK): exit 0 while it works, 1 otherwise",
    )
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings too go out in the chosen format


def _flavour(args: argparse.Namespace) -> Flavour:
    return detect_flavour() if args.flavour == "auto" else Flavour(args.flavour)


def _iptables(args: argparse.Namespace) -> Writer:
    """The writer asked for: iptables-restore of Docker's flavour, or libiptc on a legacy host."""
    if args.writer not in WRITERS:
        raise NetfilterError(f"unknown writer {args.writer!r}: choose one of {', '.join(WRITERS)}")
    flavour = _flavour(args)
    if args.writer == "iptc":
        if flavour is not Flavour.LEGACY:
            raise NetfilterError(
                f"--writer iptc cannot be used here: python-iptables (libiptc) writes only the legacy tables, "
                f"but this host's rules go to the {flavour} tables (Docker's chains are there, or --flavour says "
                "so); rules written to the other flavour would not route anything. Use --writer restore or auto."
            )
        from .iptc_writer import IptcWriter

        log.info("writer: python-iptables (libiptc) into the legacy tables, one atomic commit per table")
        return IptcWriter()
    if args.writer == "auto":
        log.info("writer auto: iptables-%s-restore (on a legacy host --writer iptc also works, but is slower)", flavour)
    return Iptables(flavour)


def _mode(args: argparse.Namespace) -> Mode:
    return resolve_mode(args.provider, args.docker_url)


def _options(args: argparse.Namespace) -> Options:
    snat_always = args.snat == "always" or (args.snat == "auto" and _mode(args) is not Mode.LOCAL)
    return Options(
        mark_bit=args.mark_bit,
        listen_address=args.listen_address,
        snat_always=snat_always,
        route_localhost=args.route_localhost and not args.listen_address,
    )


def _listed(args: argparse.Namespace) -> list[ContainerSnapshot]:
    """One listing of every source's labelled containers (or tasks)."""
    providers = build_providers(_mode(args), args.docker_url, args.label_prefix, Metrics(lambda: ({}, [])))
    return [snapshot for provider in providers for snapshot in provider.list()]


def cmd_run(args: argparse.Namespace) -> int:
    lock = TablesLock()
    if not claim_tables(lock, args.standby):
        return EXIT_TABLES_OWNED
    iptables = _iptables(args)
    log.info("tcprouter starting: writing the %s tables with %r", iptables.flavour, iptables)
    metrics = Metrics(kernel_reader(iptables.flavour))
    mode = _mode(args)
    providers = build_providers(
        mode, args.docker_url, args.label_prefix, metrics, poll_interval=args.swarm_poll_interval
    )
    log.info("backends from %s: %s", mode, ", ".join(p.source for p in providers))
    options = _options(args)
    if options.route_localhost and not enable_route_localnet():
        options = dataclasses.replace(options, route_localhost=False)
    timing = Timing(resync_interval=args.resync_interval, check_interval=args.check_interval)
    probing = ProbePolicy(args.probe_interval, args.probe_timeout, args.probe_fall, args.probe_rise)
    return serve(providers, iptables, metrics, options, args.label_prefix, timing, probing, lock, args.metrics_address)


def cmd_render(args: argparse.Namespace) -> int:
    state = desired_state(_listed(args), args.label_prefix, hostports.host_tcp_listeners())
    rules = compile_rules(state, _options(args))
    sys.stdout.write(restore_script({}, rules))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    iptables = _iptables(args)
    current, _ = iptables.read()
    script = restore_script(current, RuleSet(chains={}))
    iptables.restore(script)
    removed = script.count("\n-X ")
    log.info("removed %d owned chains and their hooks from the %s tables", removed, iptables.flavour)
    return 0


_DNAT_TARGET = re.compile(r"-j DNAT --to-destination (\S+)")


def _kernel_targets(kernel: list[tuple[str, SavedRule]]) -> set[tuple[int, str]]:
    """(frontend port, "ip:port") of every DNAT rule in the kernel's frontend chains."""
    targets = set()
    for table, rule in kernel:
        match = _DNAT_TARGET.search(rule.spec)
        if table == "nat" and rule.chain.startswith(FRONTEND_CHAIN_PREFIX) and match:
            targets.add((int(rule.chain.removeprefix(FRONTEND_CHAIN_PREFIX)), match.group(1)))
    return targets


def status_report(
    containers: Iterable[ContainerSnapshot],
    kernel: list[tuple[str, SavedRule]],
    prefix: str,
    busy_ports: Mapping[int, str] | None = None,
) -> dict:
    """What Docker declares and what the kernel holds, per frontend and backend.

    Every running container with valid labels is listed under its frontend, in rotation order; `in_rotation`
    says whether it should receive connections now (running, not unhealthy or starting), `in_kernel` whether
    a DNAT rule sends connections to it, `connections` what that rule counted since the pool last changed.
    """
    containers = sorted(containers, key=lambda c: c.age_order)
    state = desired_state(containers, prefix, busy_ports)
    rejected = {r.container_id for r in state.rejections}
    connections = backend_connections(kernel)
    targets = _kernel_targets(kernel)
    in_rotation = {b.container_id for frontend in state.frontends.values() for b in frontend.backends}
    pools: dict[int, list[dict]] = {port: [] for port in state.frontends}
    for container in containers:
        if not container.running or container.id in rejected:
            continue  # a rejected container is listed under "rejected"
        spec = parse_backend(container, prefix)
        backend, port = spec.backend, spec.frontend_port
        address = f"{backend.ip}:{backend.port}"
        pools[port].append(
            {
                "container": backend.name,
                "id": backend.container_id[:12],
                "node": backend.node,
                "address": address,
                "health": container.health or "none",
                "weight": backend.weight,
                "in_rotation": container.id in in_rotation,
                "in_kernel": (port, address) in targets,
                "connections": connections.get((str(port), backend.name), 0),
            }
        )
    return {
        "frontends": [
            {"port": port, "balance": str(frontend.balance), "backends": pools[port]}
            for port, frontend in sorted(state.frontends.items())
        ],
        "rejected": [
            {"container": r.name, "id": r.container_id[:12], "reason": r.reason, "detail": r.detail}
            for r in state.rejections
        ],
        "warnings": list(state.warnings),
    }


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    cells = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]


def render_status(report: dict) -> str:
    """The human form of `status_report`: one table of frontends and backends, one of rejected containers."""
    yes_no = {True: "yes", False: "no"}
    rows = []
    for frontend in report["frontends"]:
        lead = [f":{frontend['port']}", frontend["balance"]]
        if not frontend["backends"]:
            rows.append([*lead, "(no backend)", "", "", "", "", "", "", ""])
        for i, b in enumerate(frontend["backends"]):
            rows.append(
                [
                    *(lead if i == 0 else ["", ""]),
                    b["container"],
                    b["node"] or "-",
                    b["address"],
                    b["health"],
                    b["weight"],
                    yes_no[b["in_rotation"]],
                    yes_no[b["in_kernel"]],
                    b["connections"],
                ]
            )
    headers = ["FRONTEND", "BALANCE", "CONTAINER", "NODE", "ADDRESS", "HEALTH", "WEIGHT", "IN ROTATION", "IN KERNEL"]
    lines = _table([*headers, "CONNECTIONS"], rows) if rows else ["no frontends: no running container is labelled"]
    if report["rejected"]:
        rejected = ([r["container"], r["reason"], r["detail"]] for r in report["rejected"])
        lines += ["", *_table(["REJECTED CONTAINER", "REASON", "DETAIL"], rejected)]
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    containers = _listed(args)
    _, kernel = kernel_reader(_flavour(args))()
    report = status_report(containers, kernel, args.label_prefix, hostports.host_tcp_listeners())
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_status(report))
    return 0


# ---- tcprouter check: each finding is (ok, what an operator reads) ---------------------------------------

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


def _docker_urls(args: argparse.Namespace) -> list[str]:
    return args.docker_url or [os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"]


def docker_findings(args: argparse.Namespace) -> list[Finding]:
    findings = []
    for url in _docker_urls(args):
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
    available = [f for f in Flavour if shutil.which(f"iptables-{f}-restore") and shutil.which(f"iptables-{f}-save")]
    docker_in, unreadable = [], {}
    for flavour in available:
        try:
            tables, _ = Iptables(flavour, timeout=10).read()
        except NetfilterError as error:
            unreadable[flavour] = str(error)
            continue
        if holds_docker_chains(tables):
            docker_in.append(flavour)
    forced = None if args.flavour == "auto" else Flavour(args.flavour)
    return iptables_findings(available, docker_in, unreadable, forced, docker_reachable)


def cmd_check(args: argparse.Namespace) -> int:
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


def cmd_health(args: argparse.Namespace) -> int:
    """The daemon's own verdict from /healthz on its metrics address (a wildcard host is asked on loopback)."""
    if not args.metrics_address:
        print("no metrics endpoint (--metrics-address ''): nothing to ask")
        return 0
    host, _, port = args.metrics_address.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as reply:
            print(reply.read().decode().strip())
            return 0
    except urllib.error.HTTPError as error:
        print(f"unhealthy: {error.read().decode().strip()}")
    except OSError as error:
        print(f"no answer from http://{host}:{port}/healthz: {error}")
    return 1


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "render": cmd_render,
    "cleanup": cmd_cleanup,
    "check": cmd_check,
    "health": cmd_health,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except (NetfilterError, OSError) as error:
        log.error("%s", error)
        return 1
    except docker.errors.DockerException as error:
        log.error("%s", docker_problem(" or ".join(_docker_urls(args)), error))
        return 1
    except ValueError as error:  # a combination of flags that cannot work, in an operator's words
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
