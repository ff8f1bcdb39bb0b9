"""Command line: `tcprouter run | status | render | cleanup | check`.

Every flag can also be given as an environment variable TCPROUTER_<FLAG> (dashes as underscores),
which is how the sidecar container is configured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from . import discovery
from .compiler import DEFAULT_MARK_BIT, Options, RuleSet, compile_rules
from .diff import restore_script
from .labels import desired_state
from .metrics import Metrics, backend_connections
from .model import DesiredState
from .netfilter import Flavour, Iptables, NetfilterError, detect_flavour
from .reconciler import Reconciler, Settings

log = logging.getLogger("tcprouter")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _env(flag: str, default: str | None) -> str | None:
    return os.environ.get("TCPROUTER_" + flag.upper().replace("-", "_"), default)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--label-prefix", default=_env("label-prefix", "tcp"), help="label namespace (default tcp)")
    common.add_argument(
        "--docker-url",
        default=_env("docker-url", None),
        help="Docker API address (default: DOCKER_HOST or the local socket)",
    )
    common.add_argument(
        "--flavour",
        choices=["auto", *Flavour],
        default=_env("flavour", "auto"),
        help="iptables flavour to write: auto follows Docker's",
    )
    common.add_argument(
        "--listen-address",
        default=_env("listen-address", None),
        help="route only connections to this host address (default: every local address)",
    )
    common.add_argument(
        "--snat",
        choices=["hairpin", "always"],
        default=_env("snat", "hairpin"),
        help="masquerade only hairpin flows (backends see client addresses) or all flows",
    )
    common.add_argument(
        "--mark-bit",
        type=lambda v: int(v, 0),
        default=_env("mark-bit", hex(DEFAULT_MARK_BIT)),
        help="the conntrack mark bit that tags routed connections (default 0x100000)",
    )
    common.add_argument("--log-format", choices=["human", "json"], default=_env("log-format", "human"))
    common.add_argument("--log-level", default=_env("log-level", "info"))

    parser = argparse.ArgumentParser(prog="tcprouter", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[common], help="the daemon: follow Docker, keep the rules in step")
    run.add_argument(
        "--metrics-address",
        default=_env("metrics-address", ":9105"),
        help="host:port of the Prometheus endpoint ('' to disable)",
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
    status = commands.add_parser("status", parents=[common], help="frontends, backends, connections, rejections")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    commands.add_parser("render", parents=[common], help="print the rules for Docker's current state, write nothing")
    commands.add_parser("cleanup", parents=[common], help="remove every rule and chain tcprouter owns")
    commands.add_parser("check", parents=[common], help="preflight: privileges, forwarding, iptables, Docker")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler], force=True)


def _iptables(args: argparse.Namespace) -> Iptables:
    flavour = detect_flavour() if args.flavour == "auto" else Flavour(args.flavour)
    return Iptables(flavour)


def _options(args: argparse.Namespace) -> Options:
    return Options(mark_bit=args.mark_bit, listen_address=args.listen_address, snat_always=args.snat == "always")


def _current_state(args: argparse.Namespace) -> DesiredState:
    api = discovery.connect(args.docker_url, timeout=10)
    return desired_state(discovery.list_labelled(api, args.label_prefix), args.label_prefix)


def cmd_run(args: argparse.Namespace) -> int:
    iptables = _iptables(args)
    log.info("tcprouter starting: writing %s tables with iptables-%s-restore", iptables.flavour, iptables.flavour)
    metrics = Metrics(lambda: iptables.read(counters=True)[1])
    if args.metrics_address:
        metrics.serve(args.metrics_address)
    settings = Settings(
        prefix=args.label_prefix,
        options=_options(args),
        docker_url=args.docker_url,
        resync_interval=args.resync_interval,
        check_interval=args.check_interval,
    )
    reconciler = Reconciler(settings, iptables, metrics)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping; the rules stay in the kernel (use `tcprouter cleanup` to remove them)", signum)
        reconciler.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=reconciler.watch, name="docker-watcher", daemon=True).start()
    reconciler.run()
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    rules = compile_rules(_current_state(args), _options(args))
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


def status_report(state: DesiredState, connections: dict[tuple[str, str], int]) -> dict:
    return {
        "frontends": [
            {
                "port": port,
                "balance": str(frontend.balance),
                "backends": [
                    {
                        "container": b.name,
                        "id": b.container_id[:12],
                        "address": f"{b.ip}:{b.port}",
                        "weight": b.weight,
                        "connections": connections.get((str(port), b.name), 0),
                    }
                    for b in frontend.backends
                ],
            }
            for port, frontend in sorted(state.frontends.items())
        ],
        "rejected": [
            {"container": r.name, "id": r.container_id[:12], "reason": r.reason, "detail": r.detail}
            for r in state.rejections
        ],
        "warnings": list(state.warnings),
    }


def cmd_status(args: argparse.Namespace) -> int:
    state = _current_state(args)
    _, counted = _iptables(args).read(counters=True)
    report = status_report(state, backend_connections(counted))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for frontend in report["frontends"]:
        print(f"frontend :{frontend['port']} ({frontend['balance']}, {len(frontend['backends'])} backends)")
        for b in frontend["backends"]:
            print(f"  {b['container']:<30} {b['address']:<22} weight {b['weight']:<3} {b['connections']} connections")
    for r in report["rejected"]:
        print(f"rejected {r['container']}: {r['detail']}")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("not running as root: writing iptables rules needs root or CAP_NET_ADMIN")
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            if f.read().strip() != "1":
                problems.append("net.ipv4.ip_forward is 0: routed connections would be dropped")
    except OSError as error:
        problems.append(f"cannot read net.ipv4.ip_forward: {error}")
    try:
        iptables = _iptables(args)
        iptables.read()
        print(f"ok: iptables {iptables.flavour} tables readable")
    except NetfilterError as error:
        problems.append(f"iptables unusable: {error}")
    try:
        discovery.connect(args.docker_url, timeout=5).ping()
        print("ok: Docker reachable")
    except Exception as error:
        problems.append(f"Docker unreachable: {error}")
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if problems else 0


COMMANDS = {"run": cmd_run, "status": cmd_status, "render": cmd_render, "cleanup": cmd_cleanup, "check": cmd_check}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except (NetfilterError, OSError) as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
