"""scripts/bench: tcprouter side by side with direct access, HAProxy and Docker's -p; control plane; scale.

Usage: scripts/bench [--phases data,control,scale,flood] [--rounds 3] [--duration 5] [--trials 50] ...
       scripts/bench --phases gateway [--rounds 3] [--duration 5] [--gateway-trials 30]   (Swarm gateway mode)
       scripts/bench --report bench-results/FILE.json     (print the tables of an earlier run)
Writes bench-results/bench-<time>.json and prints Markdown tables with the ratios of this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .common import REPO, ensure_images, ensure_packages, log, machine
from .report import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--phases",
        default="control,data,scale",
        help="comma-separated, run in this order: control (first, on a host without the data plane's "
        "leftover sockets), data, scale, gateway (not in the default: a 3-node Swarm lab, about 6 more minutes), "
        "flood (namespaces only: a SYN flood with and without SYNPROXY)",
    )
    parser.add_argument(
        "--figures", default="new_connections,keepalive,bulk", help="data-plane figures (one locked phase each)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="data plane: rounds over all paths per figure")
    parser.add_argument("--duration", type=float, default=5, help="data plane: seconds per wrk run")
    parser.add_argument("--probes", type=int, default=2000, help="data plane: unloaded latency samples per path")
    parser.add_argument("--trials", type=int, default=50, help="control plane: start/kill trials")
    parser.add_argument(
        "--control-variant",
        default="0.02,0.005",
        help="control plane, once more with the daemon's event batching set to MAX_DELAY,SETTLE seconds "
        "(default 0.02,0.005; '' to skip): what a shorter batching window buys",
    )
    parser.add_argument("--sizes", default="10,100,1000", help="scale: numbers of frontends (x10 backends)")
    parser.add_argument("--repeats", type=int, default=5, help="scale: repetitions of each sync")
    parser.add_argument("--samples", type=int, default=5000, help="scale: first-packet samples per case")
    parser.add_argument(
        "--gateway-figures",
        default="new_connections,keepalive",
        help="gateway: data-plane figures through the Swarm gateway (also uses --rounds, --duration, --probes)",
    )
    parser.add_argument(
        "--gateway-trials", type=int, default=30, help="gateway: scale-up/scale-down trials (task running -> routed)"
    )
    parser.add_argument(
        "--gateway-router-args",
        default="",
        help="gateway: extra `tcprouter run` arguments, e.g. '--swarm-poll-interval 0.1' (default: none)",
    )
    parser.add_argument("--output", type=Path, help="JSON result (default bench-results/bench-<time>.json)")
    parser.add_argument("--flood-duration", type=float, default=10.0, help="seconds of SYN flood per case")
    parser.add_argument("--report", type=Path, help="only print the tables of this earlier JSON result")
    args = parser.parse_args(argv)

    if args.report:
        print(render(json.loads(args.report.read_text())))
        return 0
    if os.geteuid() != 0:
        print("scripts/bench needs root (namespaces, iptables, Docker)", file=sys.stderr)
        return 1

    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    output = args.output or REPO / "bench-results" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": {k: str(v) for k, v in vars(args).items()}}
    if {"data", "control", "gateway"} & set(phases):
        ensure_packages()
        ensure_images()
    result["machine"] = machine()

    def save() -> None:
        output.write_text(json.dumps(result, indent=1, default=str))

    try:
        if "control" in phases:
            from . import controlplane

            result["controlplane"] = controlplane.run(args.trials)
            save()
            if args.control_variant:
                max_delay, settle = (float(x) for x in args.control_variant.split(","))
                result["controlplane_variant"] = controlplane.run(args.trials, (max_delay, settle))
                save()
        if "data" in phases:
            from . import dataplane

            result["dataplane"] = {}
            for figure in [f.strip() for f in args.figures.split(",") if f.strip()]:
                result["dataplane"][figure] = dataplane.run_figure(
                    figure, args.rounds, args.duration, args.probes if figure == "new_connections" else 0
                )
                save()
        if "scale" in phases:
            from . import scale

            sizes = [int(x) for x in args.sizes.split(",")]
            result["scale"] = scale.run(sizes, args.repeats, args.samples)
            save()
        if "flood" in phases:
            from . import flood

            result["flood"] = flood.run(args.flood_duration)
            save()
        if "gateway" in phases:
            from . import gateway

            result["gateway"] = gateway.run(
                args.rounds,
                args.duration,
                args.probes,
                args.gateway_trials,
                [f.strip() for f in args.gateway_figures.split(",") if f.strip()],
                gateway.parse_router_args(args.gateway_router_args),
            )
            save()
    finally:
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        result["loadavg_at_end"] = os.getloadavg()
        save()
        log(f"result written to {output}")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
