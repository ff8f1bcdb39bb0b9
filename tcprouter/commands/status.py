"""`tcprouter status`: what Docker declares and what the kernel holds, per frontend and backend."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

from .. import hostports
from ..compiler import Tables, destination, frontend_of
from ..diff import SavedRule
from ..labels import DEFAULT_UDP_PREFIX, LabelError, desired_state, parse_backend
from ..metrics import KERNEL_READ_TIMEOUT, backend_connections
from ..model import ContainerSnapshot, Family, Protocol
from ..netfilter import Flavour, Iptables
from ..nftnat_read import slot_rules
from ..policy import DEFAULT_POLICY, Policy
from . import common

_DNAT_TARGET = re.compile(r"-j DNAT --to-destination (\S+)")


def _kernel_targets(kernel: list[tuple[str, SavedRule]]) -> set[tuple[Protocol, int, str]]:
    """(protocol, frontend port, "ip:port") of every DNAT rule in the kernel's frontend chains."""
    targets = set()
    for table, rule in kernel:
        match = _DNAT_TARGET.search(rule.spec)
        frontend = frontend_of(rule.chain) if table == "nat" else None
        if frontend is not None and match:
            targets.add((*frontend, match.group(1)))
    return targets


def status_report(
    containers: Iterable[ContainerSnapshot],
    kernel: list[tuple[str, SavedRule]],
    prefix: str,
    busy_ports: Mapping[int, str] | None = None,
    policy: Policy = DEFAULT_POLICY,
    udp_prefix: str = DEFAULT_UDP_PREFIX,
    udp_busy_ports: Mapping[int, str] | None = None,
    kernel6: list[tuple[str, SavedRule]] | None = None,
) -> dict:
    """What Docker declares and what the kernel holds, per frontend and backend.

    Every running container with valid labels is listed under its frontend, in rotation order, once per address
    family it is reached in (IPv6 too with `kernel6`, the ip6tables rules, when it has an IPv6 address);
    `in_rotation` says whether it should receive connections now (running, not unhealthy or starting), `in_kernel`
    whether a DNAT rule of its family sends connections to it, `connections` what that rule counted since the pool
    last changed (UDP: new flows). TCP frontends come first, then UDP ones.
    """
    containers = sorted(containers, key=lambda c: c.age_order)
    state = desired_state(containers, prefix, busy_ports, policy, udp_prefix, udp_busy_ports)
    rejected = {(r.protocol, r.container_id) for r in state.rejections}
    kernels = {Family.IPV4: kernel} | ({Family.IPV6: kernel6} if kernel6 is not None else {})
    targets = {family: _kernel_targets(rules) for family, rules in kernels.items()}
    frontends = []
    for protocol, label_prefix in ((Protocol.TCP, prefix), (Protocol.UDP, udp_prefix)):
        connections = {family: backend_connections(rules, protocol) for family, rules in kernels.items()}
        in_rotation = {b.container_id for frontend in state.pools(protocol).values() for b in frontend.backends}
        pools: dict[int, list[dict]] = {port: [] for port in state.pools(protocol)}
        for container in containers:
            if not container.running or (protocol, container.id) in rejected:
                continue  # a rejected container is listed under "rejected"
            try:
                spec = parse_backend(container, label_prefix, protocol)
            except LabelError:
                continue  # no frontend of this protocol (the labels of a valid one parse)
            port = spec.frontend_port
            for family in kernels:
                backend = spec.backend.of_family(family)
                if backend is None:
                    continue  # no address of that family: not in its rules
                address = destination(backend.ip, backend.port)
                pools[port].append(
                    {
                        "container": backend.name,
                        "id": backend.container_id[:12],
                        "node": backend.node,
                        "family": str(family),
                        "address": address,
                        "health": container.health or "none",
                        "weight": backend.weight,
                        "in_rotation": container.id in in_rotation,
                        "in_kernel": (protocol, port, address) in targets[family],
                        "connections": connections[family].get((str(port), backend.name), 0),
                    }
                )
        frontends += [
            {"port": port, "protocol": str(protocol), "balance": str(frontend.balance), "backends": pools[port]}
            for port, frontend in sorted(state.pools(protocol).items())
        ]
    return {
        "frontends": frontends,
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
        # Docker's notation: a port is TCP unless it says /udp.
        suffix = "" if frontend["protocol"] == Protocol.TCP else f"/{frontend['protocol']}"
        lead = [f":{frontend['port']}{suffix}", frontend["balance"]]
        if not frontend["backends"]:
            rows.append([*lead, "(no backend)", "", "", "", "", "", "", "", ""])
        for i, b in enumerate(frontend["backends"]):
            rows.append(
                [
                    *(lead if i == 0 else ["", ""]),
                    b["container"],
                    b["node"] or "-",
                    b["family"],
                    b["address"],
                    b["health"],
                    b["weight"],
                    yes_no[b["in_rotation"]],
                    yes_no[b["in_kernel"]],
                    b["connections"],
                ]
            )
    headers = [
        "FRONTEND",
        "BALANCE",
        "CONTAINER",
        "NODE",
        "FAMILY",
        "ADDRESS",
        "HEALTH",
        "WEIGHT",
        "IN ROTATION",
        "IN KERNEL",
    ]
    lines = _table([*headers, "CONNECTIONS"], rows) if rows else ["no frontends: no running container is labelled"]
    if report["rejected"]:
        rejected = ([r["container"], r["reason"], r["detail"]] for r in report["rejected"])
        lines += ["", *_table(["REJECTED CONTAINER", "REASON", "DETAIL"], rejected)]
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines) + "\n"


def _kernel_rules(flavour: Flavour, family: Family) -> tuple[Tables, list[tuple[str, SavedRule]]]:
    """A family's tables and rules with their counters. On an nft host the nat side may be in tcprouter's nftables
    tables, whichever --nat this command is given (the daemon's choice): their slots come with the rules, as the DNAT
    rules iptables would hold (none if there are no such tables)."""
    tables, rules = Iptables(flavour, timeout=KERNEL_READ_TIMEOUT, family=family).read(counters=True)
    if flavour is Flavour.NFT:
        rules += slot_rules(family, timeout=KERNEL_READ_TIMEOUT)
    return tables, rules


def command(args: argparse.Namespace) -> int:
    containers = common.listed(args)
    flavour = common.flavour(args)
    options = common.options(args)
    tables, kernel = _kernel_rules(flavour, Family.IPV4)
    kernel6 = _kernel_rules(flavour, Family.IPV6)[1] if Family.IPV6 in common.families(args, flavour) else None
    docker_chain = tables.get("nat", {}).get(hostports.DOCKER_NAT_CHAIN, ())
    busy = {p: hostports.busy_ports(docker_chain, options.route_localhost, p) for p in Protocol}
    report = status_report(
        containers,
        kernel,
        args.label_prefix,
        busy[Protocol.TCP],
        options.policy,
        args.udp_label_prefix,
        busy[Protocol.UDP],
        kernel6,
    )
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_status(report))
    return 0
