"""Command line: `tcprouter run | status | render | cleanup | check | health`.

Every flag can also be given as an environment variable TCPROUTER_<FLAG> (dashes as underscores; --swarm and
--engines as TCPROUTER_PROVIDER=swarm|engines), which is how the sidecar container is configured. A variable
goes through the same checks as its flag; a flag on the command line wins over its variable.
This module only parses, validates and dispatches: each command lives in tcprouter.commands.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import docker.errors

from .commands import check, cleanup, common, health, render, run, status
from .compiler import DEFAULT_MARK_BIT
from .daemon import EXIT_TABLES_OWNED, Mode, sources_problem
from .labels import DEFAULT_PREFIX, DEFAULT_UDP_PREFIX
from .logs import setup_logging
from .metrics import KERNEL_READ_INTERVAL
from .model import Family
from .netfilter import WRITERS, Flavour, NetfilterError
from .policy import COMPOSE_OWNER_LABEL, STACK_OWNER_LABEL, PortSet, parse_ports

log = logging.getLogger("tcprouter")
LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_PREFIX = "TCPROUTER_"
TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": run.command,
    "status": status.command,
    "render": render.command,
    "cleanup": cleanup.command,
    "check": check.command,
    "health": health.command,
}


# ---- value types: each raises ArgumentTypeError with the reason, which argparse prints ----------------------


def _positive(convert: Callable[[str], float], zero: bool = False) -> Callable[[str], float]:
    """A number above 0 (or 0 too, with `zero`)."""

    def positive(value: str) -> float:
        try:
            number = convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if number < 0 or (number == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'0 or ' if zero else ''}more than 0: {value!r}")
        return number

    return positive


def _mark_bit(value: str) -> int:
    try:
        bit = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if bit <= 0 or bit >= 1 << 32 or bit & (bit - 1):
        raise argparse.ArgumentTypeError(f"must be one bit of the 32-bit conntrack mark, like 0x100000: {value!r}")
    return bit


def _address(value: str) -> str | None:
    """An IPv4 or IPv6 address of the host; '' means every local address (None)."""
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IPv4 or IPv6 address: {value!r}") from None


def _host_port(value: str) -> str:
    """host:port, :port or [v6]:port; '' (no endpoint) stays ''."""
    if not value:
        return value
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected host:port, :port or [IPv6]:port (or '' for none): {value!r}")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an IPv6 address in brackets: {value!r}") from None
    elif host and not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise argparse.ArgumentTypeError(f"not a host name or IPv4 address: {value!r}")
    return value


def _label_prefix(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_' or '-': {value!r}")
    return value


def _ports(value: str) -> PortSet:
    try:
        return parse_ports(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _owner_label(value: str) -> str:
    """A Docker label key; '' turns ownership off."""
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", value):
        raise argparse.ArgumentTypeError(f"not a label key (letters, digits, '.', '_', '/' or '-'): {value!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, exit status 2 (argparse would print the whole usage first)."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _UrlList(argparse.Action):
    """A repeatable flag whose first use on the command line replaces the list its variable gave, rather than
    adding to it: the default and the variable's list are tuples, the command line's a list."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values, option=None) -> None:
        current = getattr(namespace, self.dest)
        setattr(namespace, self.dest, [*current, values] if isinstance(current, list) else [values])


ENVIRONMENT = (
    "Every flag can also be set as TCPROUTER_<FLAG> (dashes as underscores; --swarm and --engines as "
    "TCPROUTER_PROVIDER=swarm|engines; switches as 1/true/yes/on or 0/false/no/off; TCPROUTER_DOCKER_URL may "
    "list several URLs). A flag on the command line wins over its variable."
)


# ---- the parsers --------------------------------------------------------------------------------------------
def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (which picks the command) and each command's parser, with the flags' defaults."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--label-prefix", type=_label_prefix, default=DEFAULT_PREFIX, help="label namespace (default %(default)s)"
    )
    common.add_argument(
        "--udp-label-prefix",
        type=_label_prefix,
        default=DEFAULT_UDP_PREFIX,
        help="label namespace of UDP frontends (default %(default)s: udp.port=5683)",
    )
    common.add_argument(
        "--docker-url",
        action=_UrlList,
        default=(),
        help="Docker API address (default: DOCKER_HOST or the local socket); once per engine with --engines; "
        "TLS from DOCKER_TLS_VERIFY and DOCKER_CERT_PATH as the Docker CLI reads them; ssh://user@host works too",
    )
    modes = common.add_mutually_exclusive_group()
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
        choices=["auto", *map(str, Flavour)],
        default="auto",
        help="iptables flavour to write: auto follows Docker's",
    )
    common.add_argument(
        "--writer",
        choices=WRITERS,
        default="auto",
        help="restore: pipe the rules into iptables-<flavour>-restore; iptc: write them in-process with "
        "python-iptables (libiptc, legacy hosts only); auto: restore (the faster one, see scripts/bench-writers)",
    )
    common.add_argument(
        "--nat",
        choices=["iptables", "nftables"],
        default="iptables",
        help="where the frontends' dispatch and DNAT live: iptables chains (TCPR-FE-<port>), or nftables tables of "
        "tcprouter's own (tcprouter-00..63, iptables-nft hosts): a change costs milliseconds at 10,000 frontends, "
        "where the iptables nat table takes ~150 ms to commit; the filter side stays in iptables either way",
    )
    common.add_argument(
        "--listen-address",
        type=_address,
        help="route only connections to this address of the host (default: every local address); an IPv4 address "
        "routes IPv4 only, an IPv6 one IPv6 only",
    )
    common.add_argument(
        "--ipv6",
        choices=["auto", "off"],
        default="auto",
        help="auto: route over IPv6 too (ip6tables of the same flavour), to the IPv6 addresses of backends on "
        "networks created with --ipv6, where Docker programs ip6tables (local mode); off: IPv4 only",
    )
    common.add_argument(
        "--snat",
        choices=["auto", "hairpin", "always"],
        default="auto",
        help="hairpin: masquerade only hairpin flows (backends see client addresses); always: every flow (backends "
        "whose replies do not route back through this host); auto: always in gateway mode, else hairpin",
    )
    common.add_argument(
        "--route-localhost",
        action="store_true",
        help="also route 127.0.0.1:<port> from the host (sets net.ipv4.conf.all.route_localnet=1, "
        "and drops martian packets to 127.0.0.0/8; `cleanup` restores the value it had before)",
    )
    common.add_argument(
        "--synproxy",
        action="store_true",
        help="SYN-flood protection for every frontend (as the label tcp.synproxy=true does for one): the kernel's "
        "SYNPROXY answers SYNs with cookies, so spoofed SYNs create no conntrack entry; sets "
        "net.netfilter.nf_conntrack_tcp_loose=0 while in use (`cleanup` restores the value it had before)",
    )
    common.add_argument(
        "--ports",
        type=_ports,
        help="the frontend ports containers may claim, as ports and ranges (1883,8000-8100,27017; default: "
        "every port); a container claiming another is rejected (port_not_allowed)",
    )
    common.add_argument(
        "--owner-label",
        type=_owner_label,
        help="the label whose value owns a frontend: its oldest backend's; a container of another owner that "
        f"claims the port is rejected (port_owned). Default {COMPOSE_OWNER_LABEL}, {STACK_OWNER_LABEL} with "
        "--swarm; '' lets any container join any frontend",
    )
    common.add_argument(
        "--mark-bit",
        type=_mark_bit,
        default=DEFAULT_MARK_BIT,
        help="the conntrack mark bit that tags routed connections (default 0x100000)",
    )
    common.add_argument("--log-format", choices=["human", "json"], default="human")
    common.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info")

    parser = _Parser(prog="tcprouter", description=__doc__.splitlines()[0], epilog=ENVIRONMENT)
    commands = parser.add_subparsers(dest="command", required=True)
    metrics = _Parser(add_help=False)
    metrics.add_argument(
        "--metrics-address",
        type=_host_port,
        default=":9105",
        help="host:port of the Prometheus endpoint, /metrics and /healthz ('' to disable)",
    )
    run = commands.add_parser(
        "run", parents=[common, metrics], help="the daemon: follow Docker, keep the rules in step", epilog=ENVIRONMENT
    )
    run.add_argument(
        "--standby",
        action="store_true",
        help="when another tcprouter owns this host's tables, wait as a hot standby and take over when it stops "
        f"(without it, exit with status {EXIT_TABLES_OWNED})",
    )
    run.add_argument(
        "--keep-flows",
        action="store_true",
        help="leave the conntrack entries of backends that left to time out, instead of deleting those of a UDP "
        "backend that leaves and of a TCP backend that is gone (a client keeps sending to the backend it had)",
    )
    run.add_argument(
        "--resync-interval",
        type=_positive(float),
        default=60.0,
        help="seconds between full resyncs against the kernel",
    )
    run.add_argument(
        "--check-interval",
        type=_positive(float),
        default=1.0,
        help="seconds between drift checks of the hooks and top-level chains",
    )
    run.add_argument(
        "--metrics-read-interval",
        type=_positive(float, zero=True),
        default=KERNEL_READ_INTERVAL,
        help="seconds between reads of the kernel's counters for /metrics: a scrape is served the last read and "
        "starts a fresh one if it is older (0: every scrape reads, and waits)",
    )
    run.add_argument(
        "--swarm-poll-interval",
        type=_positive(float),
        default=0.5,
        help="seconds between task listings of the Swarm manager (also listed on every service or node event)",
    )
    run.add_argument(
        "--probe-interval",
        type=_positive(float),
        default=1.0,
        help="seconds between TCP probes of each remote backend (gateway mode)",
    )
    run.add_argument(
        "--probe-timeout",
        type=_positive(float),
        default=0.5,
        help="seconds a probe's TCP connect may take",
    )
    run.add_argument(
        "--probe-fall",
        type=_positive(int),
        default=2,
        help="failed probes in a row that take a remote backend out of the rotation",
    )
    run.add_argument(
        "--probe-rise",
        type=_positive(int),
        default=1,
        help="successful probes in a row that bring it back",
    )
    status = commands.add_parser(
        "status", parents=[common], help="frontends, backends, connections, rejections", epilog=ENVIRONMENT
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    render_command = commands.add_parser(
        "render", parents=[common], help="print the rules for Docker's current state, write nothing", epilog=ENVIRONMENT
    )
    render_command.add_argument(
        "--family",
        choices=[str(f) for f in Family],
        default=str(Family.IPV4),
        help="the rules of which address family: ipv4 (an iptables-restore script) or ipv6 (ip6tables-restore)",
    )
    commands.add_parser(
        "cleanup", parents=[common], help="remove every rule and chain tcprouter owns", epilog=ENVIRONMENT
    )
    commands.add_parser(
        "check", parents=[common], help="preflight: privileges, forwarding, iptables, Docker", epilog=ENVIRONMENT
    )
    commands.add_parser(
        "health",
        parents=[common, metrics],
        help="ask the daemon's /healthz (the image's HEALTHCHECK): exit 0 while it works, 1 otherwise",
        epilog=ENVIRONMENT,
    )
    return parser, dict(commands.choices)


# ---- the environment: each TCPROUTER_* variable parsed as its flag would be -------------------------------


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def options_by_dest(command: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """A command's options, grouped by the setting they set (--swarm and --engines both set `provider`)."""
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in command._actions:  # argparse has no public list of a parser's options
        if action.option_strings and action.dest != "help":
            by_dest.setdefault(action.dest, []).append(action)
    return by_dest


def _tokens(actions: list[argparse.Action], value: str) -> list[str]:
    """The command-line words that mean what the variable says; ArgumentError if it can mean nothing."""
    flag = actions[0].option_strings[-1]
    if actions[0].nargs != 0:
        if isinstance(actions[0], _UrlList):  # a list: separated by spaces or commas
            return [f"{flag}={url}" for url in value.replace(",", " ").split()]
        return [f"{flag}={value}"]
    switches = {str(a.const): a.option_strings[-1] for a in actions}  # a switch, or a choice between switches
    if list(switches) == ["True"]:
        if value.lower() in TRUE + FALSE:
            return [flag] if value.lower() in TRUE else []
        raise argparse.ArgumentError(actions[0], f"expected one of {', '.join(TRUE + FALSE[1:])} (or empty)")
    if value in switches or not value:
        return [switches[value]] if value else []
    either = "/".join(switches.values())
    raise argparse.ArgumentError(
        None, f"argument {either}: invalid choice: {value!r} (choose from {', '.join(switches)})"
    )


def _from_environment(command: argparse.ArgumentParser, environ: Mapping[str, str]) -> argparse.Namespace:
    """The settings the TCPROUTER_* variables give, validated by the command's own parser; exit 2 naming the
    variable if one is invalid."""
    settings = argparse.Namespace()
    command.exit_on_error = False  # raise ArgumentError, so that the message can name the variable
    try:
        for dest, actions in options_by_dest(command).items():
            name = env_name(dest)
            if name not in environ:
                continue
            try:
                command.parse_args(_tokens(actions, environ[name]), namespace=settings)
            except argparse.ArgumentError as error:
                command.error(f"{name}={environ[name]!r}: {error}")
    finally:
        command.exit_on_error = True
    for dest, value in vars(settings).items():
        if isinstance(value, list):  # the command line's first use replaces it (_UrlList)
            setattr(settings, dest, tuple(value))
    return settings


# ---- combinations that cannot work --------------------------------------------------------------------------

GATEWAY_ONLY = ("probe_interval", "probe_timeout", "probe_fall", "probe_rise")


def problems(args: argparse.Namespace, defaults: Mapping[str, object]) -> list[str]:
    """What cannot work in these settings, one sentence each (`defaults`: the command's defaults)."""
    found = []
    if args.route_localhost and args.listen_address:
        found.append("--route-localhost routes 127.0.0.1, which --listen-address leaves out: give one or the other")
    if args.ipv6 == "off" and args.listen_address and ":" in args.listen_address:
        found.append("--listen-address is an IPv6 address, which --ipv6 off does not route: give one or the other")
    mode = common.mode(args)
    sources = sources_problem(mode, args.docker_url)
    if sources:
        found.append(sources)
    changed = {dest for dest in defaults if hasattr(args, dest) and getattr(args, dest) != defaults[dest]}
    if mode is Mode.LOCAL:
        found += [
            f"--{dest.replace('_', '-')} applies only in gateway mode (--swarm or --engines), where backends are probed"
            for dest in GATEWAY_ONLY
            if dest in changed
        ]
    if args.udp_label_prefix == args.label_prefix:
        found.append(f"--udp-label-prefix and --label-prefix are both {args.label_prefix!r}: give each its own")
    if mode is not Mode.SWARM and "swarm_poll_interval" in changed:
        found.append("--swarm-poll-interval applies only with --swarm")
    if hasattr(args, "probe_timeout") and args.probe_timeout >= args.probe_interval:
        found.append(
            f"--probe-timeout ({args.probe_timeout:g}s) must be shorter than --probe-interval "
            f"({args.probe_interval:g}s)"
        )
    return found


def parse_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The settings of the command line and the TCPROUTER_* variables; exit 2 with one clear line if invalid."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    parser, commands = parsers()
    name = parser.parse_args(argv[:1]).command
    command = commands[name]
    args = command.parse_args(argv[1:], namespace=_from_environment(command, environ))
    args.command = name
    args.docker_url = list(args.docker_url)
    found = problems(args, {a.dest: a.default for a in command._actions})
    if found:
        command.error("; ".join(found))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    try:
        return COMMANDS[args.command](args)
    except (NetfilterError, OSError) as error:
        log.error("%s", error)
        return 1
    except docker.errors.DockerException as error:
        log.error("%s", check.docker_problem(" or ".join(check.docker_urls(args)), error))
        return 1


if __name__ == "__main__":
    sys.exit(main())
