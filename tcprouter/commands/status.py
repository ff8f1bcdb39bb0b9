"""`tcprouter status`: what Docker declares and what the kernel holds, per frontend and backend."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

from .. import hostports
from ..compiler import frontend_port
from ..diff import SavedRule
from ..labels import desired_state, parse_backend
from ..metrics import backend_connections, kernel_reader
from ..model import ContainerSnapshot
from ..policy import DEFAULT_POLICY, Policy
from . import common

_DNAT_TARGET = re.compile(r"-j DNAT --to-destination (\S+)")


def _kernel_targets(kernel: list[tuple[str, SavedRule]]) -> set[tuple[int, str]]:
    """(frontend port, "ip:port") of every DNAT rule in the kernel's frontend chains."""
    targets = set()
    for table, rule in kernel:
        match = _DNAT_TARGET.search(rule.spec)
        port = frontend_port(rule.chain) if table == "nat" else None
        if port is not None and match:
            targets.add((port, match.group(1)))
    return targets


def status_report(
    containers: Iterable[ContainerSnapshot],
    kernel: list[tuple[str, SavedRule]],
    prefix: str,
    busy_ports: Mapping[int, str] | None = None,
    policy: Policy = DEFAULT_POLICY,
) -> dict:
    """What Docker declares and what the kernel holds, per frontend and backend.

    Every running container with valid labels is listed under its frontend, in rotation order; `in_rotation`
    says whether it should receive connections now (running, not unhealthy or starting), `in_kernel` whether
    a DNAT rule sends connections to it, `connections` what that rule counted since the pool last changed.
    """
    containers = sorted(containers, key=lambda c: c.age_order)
    state = desired_state(containers, prefix, busy_ports, policy)
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


def command(args: argparse.Namespace) -> int:
    containers = common.listed(args)
    tables, kernel = kernel_reader(common.flavour(args))()
    options = common.options(args)
    busy = hostports.busy_ports(tables.get("nat", {}).get(hostports.DOCKER_NAT_CHAIN, ()), options.route_localhost)
    report = status_report(containers, kernel, args.label_prefix, busy, options.policy)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_status(report))
    return 0
