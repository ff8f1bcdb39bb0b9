"""JSON result -> Markdown tables, with the ratios measured within the run and the targets checked."""

from __future__ import annotations

import statistics


def _per_round_ratio(runs: dict[str, list[dict]], path: str, base: str, key: str) -> list[float]:
    return [a[key] / b[key] for a, b in zip(runs[path], runs[base], strict=False) if b[key]]


def _ratio_text(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


BACKENDS = {
    "direct": "1 (be0)",
    "tcprouter": "3",
    "haproxy": "3",
    "docker-p": "1 (be0)",
    "direct-3": "3 (thread i -> be i)",
    "tcprouter-1": "1 (be3)",
    "haproxy-1": "1 (be3)",
    "3slots-1be": "1 (be3) in 3 slots",
}


def _dataplane(data: dict) -> tuple[list[str], dict]:
    out: list[str] = []
    checks: dict = {}
    for figure, fig in data.items():
        runs = fig["runs"]
        med = fig["median"]
        key = "bytes_per_s" if figure == "bulk" else "rps"
        unit = "MiB/s" if figure == "bulk" else ("new conn/s" if figure == "new_connections" else "req/s")
        out.append(f"### {fig['what']}\n")
        out.append(
            f"{fig['rounds']} rounds of {fig['duration_s']:g} s per path, order rotated each round; "
            "median of the rounds; the ratio is taken within each round, then its median (and range) is shown.\n"
        )
        rows = []
        for path in runs:
            value = med[path][key] / (2**20 if figure == "bulk" else 1)
            ratio = _per_round_ratio(runs, path, "direct", key)
            vs_haproxy = (
                _ratio_text(_per_round_ratio(runs, path, "haproxy", key)) if path.startswith("tcprouter") else ""
            )
            requests = sum(r["requests"] for r in runs[path])
            counted = [r.get("new_connections_counted") for r in runs[path]]
            counted_text = (
                f"{sum(counted):,} / {requests:,}"
                if figure == "new_connections" and all(c is not None for c in counted)
                else ""
            )
            rows.append(
                [
                    f"**{path}**" if path == "tcprouter" else path,
                    BACKENDS.get(path, "?"),
                    f"{value:,.0f}",
                    _ratio_text(ratio),
                    vs_haproxy,
                    f"{med[path]['lat_p50_us'] / 1000:.2f}",
                    f"{med[path]['lat_p99_us'] / 1000:.2f}",
                    f"{sum(r['errors'] for r in runs[path])}",
                    f"{med[path]['cpu_busy_fraction']:.2f}",
                    *([counted_text] if figure == "new_connections" else []),
                ]
            )
            if path == "tcprouter":
                checks[figure] = {
                    "vs_direct": statistics.median(ratio) if ratio else float("nan"),
                    "vs_haproxy": statistics.median(_per_round_ratio(runs, path, "haproxy", key)),
                    "like_for_like": statistics.median(_per_round_ratio(runs, "tcprouter-1", "direct", key))
                    if "tcprouter-1" in runs
                    else float("nan"),
                    "vs_direct3": statistics.median(_per_round_ratio(runs, "tcprouter", "direct-3", key))
                    if "direct-3" in runs
                    else float("nan"),
                }
        header = [
            "path", "backends", unit, "x direct", "x HAProxy (same backends)", "wrk p50 ms", "wrk p99 ms",
            "socket errors", "host CPU busy",
        ]  # fmt: skip
        if figure == "new_connections":
            header.append("DNAT/NEW rule count / wrk requests")
        # tcprouter-1 is compared with haproxy-1
        for row in rows:
            if row[0] == "tcprouter-1" and "haproxy-1" in runs:
                row[4] = _ratio_text(_per_round_ratio(runs, "tcprouter-1", "haproxy-1", key))
        out.append(_table(header, rows) + "\n")
        if "probe" in fig:
            prow = [
                [
                    path,
                    f"{p['connect_us']['p50']:.0f}",
                    f"{p['connect_us']['p99']:.0f}",
                    f"{p['first_byte_us']['p50']:.0f}",
                    f"{p['first_byte_us']['p99']:.0f}",
                ]
                for path, p in fig["probe"].items()
            ]
            n = next(iter(fig["probe"].values()))["connect_us"]["n"]
            out.append(
                f"Unloaded latency, {n} sequential new connections per path (Python client in the client namespace, "
                "interleaved blocks), microseconds:\n"
            )
            out.append(_table(["path", "connect p50", "connect p99", "connect+first byte p50", "p99"], prow) + "\n")
        if fig.get("router_warnings"):
            out.append(f"tcprouter logged {len(fig['router_warnings'])} warnings: {fig['router_warnings'][:3]}\n")
        if "router_rss_kb" in fig:
            out.append(f"tcprouter daemon RSS during this phase: {fig['router_rss_kb'] / 1024:.1f} MiB.\n")
    return out, checks


def _control(cp: dict) -> tuple[list[str], dict]:
    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    rows = []
    names = {
        ("start", "call_s"): "`docker start` call itself",
        ("start", "listening_s"): "start returned -> nginx answers directly (backend's own floor)",
        ("start", "routable_s"): "**start returned -> first connection through the frontend answered by it**",
        ("kill", "call_s"): "`docker kill` call itself",
        ("kill", "gone_s"): "**kill called -> last rule naming it gone**",
        ("kill", "poll_resolution_s"): "(longest `iptables -S` poll: resolution of the line above)",
    }
    for (phase, key), label in names.items():
        s = cp[phase][key]
        rows.append([label, str(s["n"]), ms(s["p50"]), ms(s["p99"]), ms(s["max"])])
    out = [_table(["interval", "n", "p50 ms", "p99 ms", "max ms"], rows) + "\n"]
    split = cp.get("split", {})
    if split:
        srows = [
            [
                action,
                str(parts["docker_s"]["n"]),
                f"{ms(parts['docker_s']['p50'])} / {ms(parts['docker_s']['p99'])}",
                f"{ms(parts['tcprouter_s']['p50'])} / {ms(parts['tcprouter_s']['p99'])}",
            ]
            for action, parts in split.items()
        ]
        out.append(
            "The same intervals split at the timestamp of Docker's own event (`start` / `kill`, from the event "
            "stream): Docker's share is call -> event, tcprouter's is event -> answered through the frontend / "
            "rule gone (including the kernel and the poll):\n"
        )
        out.append(_table(["trial", "n", "Docker: call -> event p50 / p99 ms", "event -> done p50 / p99 ms"], srows))
        out.append("")
    metric = cp["event_to_rules_metric"]
    out.append(
        f"tcprouter_event_to_rules_seconds over the trials (all container and network events, {metric['count']:.0f} "
        f"observations): mean {metric['mean_s'] * 1000:.1f} ms, p50 <= {metric['p50_at_most_s'] * 1000:g} ms, "
        f"p99 <= {metric['p99_at_most_s'] * 1000:g} ms (bucket bounds); cumulative buckets "
        + ", ".join(f"<= {float(k) * 1000:g} ms: {v:.0f}" for k, v in metric["buckets"].items() if k != "inf")
        + ".\n"
    )
    for phase, part in cp.get("event_to_rules_metric_by_trial", {}).items():
        out.append(
            f"- observations made during the {phase} half of the trials: {part['count']:.0f}, mean "
            f"{part['mean_s'] * 1000:.1f} ms; cumulative buckets "
            + ", ".join(f"<= {float(k) * 1000:g} ms: {v:.0f}" for k, v in part["buckets"].items() if float(k) <= 1)
            + "\n"
        )
    if cp.get("router_warnings"):
        out.append(f"tcprouter logged {len(cp['router_warnings'])} warnings, e.g. {cp['router_warnings'][:3]}\n")
    if cp["failures"]:
        out.append("Failures: " + "; ".join(cp["failures"]) + "\n")
    checks = {
        "start_p99_s": cp["start"]["routable_s"]["p99"],
        "kill_p99_s": cp["kill"]["gone_s"]["p99"],
        "trials": min(cp["start"]["routable_s"]["n"], cp["kill"]["gone_s"]["n"]),
    }
    return out, checks


def _dispatch(dp: dict) -> list[str]:
    """The first packet to the first and the last frontend, flat dispatch against the tree, per flavour."""
    connect = dp["connect_us"]
    rows = [
        [
            key.replace("_", " "),
            f"{dp['rules'][key]:,}",
            f"{connect[key + '_first']['p50']:.1f}",
            f"{connect[key + '_last']['p50']:.1f}",
            f"{connect[key + '_last']['p99']:.1f}",
            f"{ratio:.3f}",
        ]
        for key, ratio in dp["ratio_p50"].items()
    ]
    return [
        f"First packet with {dp['frontends']:,} frontends x 10, the flat dispatch against the tree of port ranges "
        f"(router namespaces side by side, {dp['samples_per_case']} samples per case in interleaved blocks), "
        "microseconds:\n",
        _table(["flavour, dispatch", "rules", "1st p50", "last p50", "last p99", "last / 1st (p50)"], rows) + "\n",
    ]


def _scale(sc: dict) -> tuple[list[str], dict]:
    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    rows, change_rows = [], []
    for row in sc["syncs"]:
        full = row["full_sync_from_empty"]
        resync = row["full_resync_unchanged"]
        rows.append(
            [
                f"{row['frontends']} x 10",
                f"{row['rule_count']:,}",
                ms(full["total_s"]),
                f"{ms(full['read_s'])} / {ms(full['compile_s'])} / {ms(full['diff_s'])} / {ms(full['restore_s'])}",
                ms(row["daemon_full_sync_s"]["p50"]),
                f"{ms(resync['total_s'])} (read {ms(resync['read_s'])})",
                ms(row["daemon_drift_check_s"]["p50"]) if "daemon_drift_check_s" in row else "-",
                ms(row["labels_s"]),
            ]
        )
        part = row["one_backend_change_partial"]
        change_rows.append(
            [
                f"{row['frontends']} x 10",
                f"{part['rules_written']:g} rules, {part['chains_rewritten']:g} chain ({part['script_lines']:g} lines)",
                ms(row["daemon_partial_sync_s"]["p50"]),
                f"{ms(part['labels_s'])} / {ms(part['compile_s'])} / {ms(part['diff_s'])} / {ms(part['restore_s'])}",
                ms(row["one_backend_change_full"]["total_s"]),
                "yes" if row["consistent_after"] else "NO",
            ]
        )
    out = ["Full sync (median of repeats; from empty tables in a private namespace):\n"]
    out.append(
        _table(
            [
                "size",
                "owned rules",
                "full sync ms",
                "read / compile / diff / restore ms",
                "daemon Syncer.sync(full) ms",
                "resync, nothing changed, ms",
                "drift check (every 1 s) ms",
                "labels -> state ms",
            ],
            rows,
        )
        + "\n"
    )
    out.append("One backend leaves or comes back (median of remove/add pairs):\n")
    out.append(
        _table(
            [
                "size",
                "written",
                "daemon Syncer.sync(partial) ms",
                "labels / compile / diff / restore ms",
                "same change by a full sync ms",
                "kernel == desired after",
            ],
            change_rows,
        )
        + "\n"
    )
    idle = next(r for r in sc["rss"] if r["frontends"] == 0)
    rss_rows = [
        [
            "idle (imports only)" if r["frontends"] == 0 else f"{r['frontends']} x 10",
            f"{r['vmrss_kb'] / 1024:.1f}",
            f"{(r['vmrss_kb'] - idle['vmrss_kb']) / 1024:+.1f}",
            f"{r.get('peak_kb', r.get('maxrss_kb', 0)) / 1024:.1f}",
        ]
        for r in sc["rss"]
    ]
    out.append("Resident memory of an interpreter holding the daemon's state (containers, desired state, rules, ")
    out.append("believed tables, metrics after one scrape):\n")
    out.append(_table(["state held", "VmRSS MiB", "vs idle", "peak (VmHWM) MiB"], rss_rows) + "\n")
    fp = sc["first_packet"]
    base = fp["connect_us"].get("1_frontend", {}).get("p50", float("nan"))
    fp_rows = [
        [case, f"{v['p50']:.1f}", f"{v['p90']:.1f}", f"{v['p99']:.1f}", f"{v['p50'] - base:+.1f}"]
        for case, v in fp["connect_us"].items()
    ]
    out.append(
        f"First-packet latency: TCP connect() time from a client namespace through a router namespace holding the "
        f"rules to a server namespace, {fp['samples_per_case']} samples per case in interleaved blocks, microseconds:\n"
    )
    out.append(_table(["case", "p50", "p90", "p99", "p50 vs 1 frontend"], fp_rows) + "\n")
    if "dispatch" in sc:
        out += _dispatch(sc["dispatch"])
    scans = [r for r in sc.get("listener_scan", []) if "netlink_s_p50" in r]
    if scans:
        out.append(
            "The scan of the host's TCP listeners (hostports): the parse of /proc/net/tcp and tcp6 against the "
            "netlink sock_diag request with a LISTEN state filter, with established loopback sockets held open "
            "in the namespace, milliseconds:\n"
        )
        out.append(
            _table(
                ["established sockets", "lines in /proc/net/tcp", "/proc p50 / max", "netlink p50 / max"],
                [
                    [
                        f"{r['sockets']:,}",
                        f"{r['proc_net_tcp_lines']:,}",
                        f"{ms(r['proc_s_p50'])} / {ms(r['proc_s_max'])}",
                        f"{ms(r['netlink_s_p50'])} / {ms(r['netlink_s_max'])}",
                    ]
                    for r in scans
                ],
            )
            + "\n"
        )
    largest = max(sc["syncs"], key=lambda r: r["frontends"])
    per_frontend = 1 + 10 + 1  # CONNMARK, ten DNAT slots, the self-connection fallback
    checks = {
        "full_sync_s": largest["full_sync_from_empty"]["total_s"],
        "daemon_full_sync_s": largest["daemon_full_sync_s"]["p50"],
        "largest": largest["frontends"],
        "rules_written_max": max(r["one_backend_change_partial"]["rules_written"] for r in sc["syncs"]),
        "per_frontend": per_frontend,
        "partial_ms_largest": largest["daemon_partial_sync_s"]["p50"] * 1000,
        "rss_mib": next(r for r in sc["rss"] if r["frontends"] == largest["frontends"])["vmrss_kb"] / 1024,
    }
    return out, checks


def render(result: dict) -> str:
    out: list[str] = []
    m = result.get("machine", {})
    out.append(
        f"Run {result.get('started')} to {result.get('finished')}: {m.get('nproc')} CPUs ({m.get('cpu')}), "
        f"{m.get('memory_gib')} GiB, kernel {m.get('kernel')}, Docker {m.get('docker')}, {m.get('iptables')}, "
        f"{m.get('wrk')}, {m.get('haproxy')}, {m.get('nginx')}, Python {m.get('python')}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start', []))}, at end "
        f"{', '.join(f'{x:.2f}' for x in result.get('loadavg_at_end', []))}.\n"
    )
    checks: dict = {}
    if "dataplane" in result:
        out.append("## Data plane\n")
        text, checks["data"] = _dataplane(result["dataplane"])
        out += text
    if "controlplane" in result:
        out.append("## Control plane\n")
        text, checks["control"] = _control(result["controlplane"])
        out += text
    if "controlplane_variant" in result:
        variant = result["controlplane_variant"]
        b = variant["batching"]
        out.append(
            "### Variant: the same trials with the daemon's event batching at max_delay "
            f"{b['max_delay_s'] * 1000:g} ms, settle {b['settle_s'] * 1000:g} ms (instead of 100 ms / 10 ms)\n"
        )
        text, checks["control_variant"] = _control(variant)
        out += text
    if "flood" in result:
        from .flood import table

        out += ["## SYN flood\n", *table(result["flood"]), ""]
    if "scale" in result:
        out.append("## Scale\n")
        text, checks["scale"] = _scale(result["scale"])
        out += text
    if "gateway" in result:
        out.append("## Gateway mode (Swarm)\n")
        out += _gateway(result["gateway"])
    targets = _targets(checks)
    if targets:
        out.append("## Targets\n")
        out.append(_table(["target", "measured", "met"], targets) + "\n")
    return "\n".join(out)


def _targets(checks: dict) -> list[list[str]]:
    rows = []
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    data = checks.get("data", {})
    for figure, label in (("new_connections", "new connections/s"), ("bulk", "bulk throughput")):
        if figure in data:
            c = data[figure]
            rows.append(
                [
                    f"tcprouter >= 0.9x direct on {label}",
                    f"{c['vs_direct']:.2f}x (3 backends vs 1); like for like: {c['like_for_like']:.2f}x "
                    f"(1 backend vs 1), {c.get('vs_direct3', float('nan')):.2f}x (3 vs direct-3)",
                    yes(c["vs_direct"] >= 0.9),
                ]
            )
            rows.append([f"tcprouter ahead of HAProxy on {label}", f"{c['vs_haproxy']:.2f}x", yes(c["vs_haproxy"] > 1)])
    control = checks.get("control")
    if control:
        rows.append(
            [
                "event-to-routable p99 <= 100 ms",
                f"start {control['start_p99_s'] * 1000:.1f} ms, kill {control['kill_p99_s'] * 1000:.1f} ms "
                f"({control['trials']} trials)",
                yes(max(control["start_p99_s"], control["kill_p99_s"]) <= 0.1),
            ]
        )
    scale = checks.get("scale")
    if scale:
        rows.append(
            [
                "a one-backend change writes O(one frontend) rules",
                f"{scale['rules_written_max']:g} rules (median of a removal and an addition) at every size "
                f"(one frontend holds {scale['per_frontend']})",
                yes(scale["rules_written_max"] <= scale["per_frontend"]),
            ]
        )
        rows.append(
            [
                f"full sync of {scale['largest']} x 10 <= 1.5 s",
                f"{scale['full_sync_s']:.3f} s (daemon's sync {scale['daemon_full_sync_s']:.3f} s)",
                yes(max(scale["full_sync_s"], scale["daemon_full_sync_s"]) <= 1.5),
            ]
        )
        rows.append(
            [
                f"RSS <= 100 MB at {scale['largest']} x 10",
                f"{scale['rss_mib']:.1f} MiB",
                yes(scale["rss_mib"] * 2**20 <= 100e6),
            ]
        )
    return rows


GATEWAY_PATHS = {
    "direct": "client -> host forwards -> node 2:published port",
    "tcprouter": "client -> host:8501, tcprouter DNAT + MASQUERADE",
    "haproxy": "client -> HAProxy on the host (TCP mode)",
    "direct-3": "no proxy: wrk thread i -> node i:published port",
}


def _gateway(gw: dict) -> list[str]:
    out: list[str] = []
    tasks = ", ".join(f"node {t['node']} {t['address']}:{t['port']}" for t in gw.get("web_tasks", []))
    out.append(
        f"A {gw['nodes']}-node Swarm lab on {gw['subnet']} (engines in network namespaces of this host), 3 nginx "
        f"tasks, one per node, each publishing port 80 in host mode ({tasks}); the client in its own namespace"
        + (f"; tcprouter run with {' '.join(gw['router_args'])}" if gw.get("router_args") else "")
        + ".\n"
    )
    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    for figure, fig in gw.get("figures", {}).items():
        runs, med = fig["runs"], fig["median"]
        key = "bytes_per_s" if figure == "bulk" else "rps"
        unit = "MiB/s" if figure == "bulk" else ("new conn/s" if figure == "new_connections" else "req/s")
        scale = 2**20 if figure == "bulk" else 1
        out.append(f"### Gateway: {fig['what']}\n")
        out.append(
            f"{fig['rounds']} rounds of {fig['duration_s']:g} s per path, order rotated each round; median of the "
            "rounds; ratios taken within each round, then their median (and range).\n"
        )
        rows = []
        for path in runs:
            counted = [r.get("new_connections_counted") for r in runs[path]]
            requests = sum(r["requests"] for r in runs[path])
            rows.append(
                [
                    f"**{path}**" if path == "tcprouter" else path,
                    GATEWAY_PATHS.get(path, "?"),
                    "1" if path == "direct" else "3",
                    f"{med[path][key] / scale:,.0f}",
                    _ratio_text(_per_round_ratio(runs, path, "direct", key)) if "direct" in runs else "-",
                    _ratio_text(_per_round_ratio(runs, path, "direct-3", key)) if "direct-3" in runs else "-",
                    _ratio_text(_per_round_ratio(runs, path, "haproxy", key)) if path == "tcprouter" else "",
                    f"{med[path]['lat_p50_us'] / 1000:.2f}",
                    f"{med[path]['lat_p99_us'] / 1000:.2f}",
                    str(sum(r["errors"] for r in runs[path])),
                    str(sum(r["syn_retransmits"] for r in runs[path])),
                    f"{med[path]['cpu_busy_fraction']:.2f}",
                    f"{sum(counted):,} / {requests:,}"
                    if figure == "new_connections" and counted and all(c is not None for c in counted)
                    else "",
                ]
            )
        header = [
            "path", "route", "nodes", unit, "x direct", "x direct-3", "x HAProxy", "wrk p50 ms", "wrk p99 ms",
            "socket errors", "SYN retransmits", "host CPU busy", "DNAT/NEW rule count / wrk requests",
        ]  # fmt: skip
        out.append(_table(header, rows) + "\n")
        if fig.get("probe"):
            prow = [
                [path, f"{p['connect_us']['p50']:.0f}", f"{p['connect_us']['p99']:.0f}",
                 f"{p['first_byte_us']['p50']:.0f}", f"{p['first_byte_us']['p99']:.0f}"]
                for path, p in fig["probe"].items()
            ]  # fmt: skip
            n = next(iter(fig["probe"].values()))["connect_us"]["n"]
            out.append(
                f"Unloaded latency, {n} sequential new connections per path (Python client in the client namespace, "
                "interleaved blocks), microseconds:\n"
            )
            out.append(_table(["path", "connect p50", "connect p99", "connect+first byte p50", "p99"], prow) + "\n")
        router_cpu = [r["router_cpu_s"] for rs in runs.values() for r in rs]
        drops = sum(
            r["conntrack_drops"] + sum(r.get("node_conntrack", {}).values()) for rs in runs.values() for r in rs
        )
        out.append(
            f"tcprouter daemon: {statistics.median(router_cpu):.2f} s CPU per run (median, following the manager and "
            f"probing, whatever the path), RSS {fig.get('router_rss_kb', 0) / 1024:.1f} MiB; conntrack drops and "
            f"insert failures, host and nodes, all runs: {drops}.\n"
        )
        if fig.get("router_warnings"):
            out.append(f"tcprouter logged {len(fig['router_warnings'])} warnings: {fig['router_warnings'][:3]}\n")
    tr = gw.get("trials")
    if tr:
        out.append("### Gateway: a task joins or leaves (scale 1 -> 2 -> 1)\n")
        names = [
            ("join", "scale_call_s", "`docker service scale` call (+1)"),
            ("join", "call_to_running_s", "scale call -> task `running` (manager's Status.Timestamp): Swarm's share"),
            (
                "join",
                "running_to_listed_s",
                "task running -> the manager's task list shows it running (polled every 20 ms)",
            ),
            ("join", "running_to_rule_s", "**task running -> its DNAT rule in the host's kernel**"),
            (
                "join",
                "running_to_answered_s",
                "**task running -> first connection through the gateway answered by it**",
            ),
            ("leave", "scale_call_s", "`docker service scale` call (-1)"),
            ("leave", "call_to_desired_s", "scale call -> task's desired state changed (its UpdatedAt)"),
            ("leave", "desired_to_rule_gone_s", "**desired state changed -> its DNAT rule gone**"),
            ("leave", "call_to_rule_gone_s", "scale call -> its DNAT rule gone"),
        ]
        rows = []
        for part, key, label in names:
            s = tr[part].get(key, {})
            if s.get("n"):
                rows.append([label, str(s["n"]), ms(s["p50"]), ms(s["p99"]), ms(s["max"])])
        out.append(_table(["interval", "n", "p50 ms", "p99 ms", "max ms"], rows) + "\n")
        poll = tr["rule_poll_s"]
        out.append(
            f"The chain `TCPR-FE-8502` was listed (`iptables -t nat -S`) in a loop, {poll['n']} polls taking "
            f"{ms(poll['p50'])} ms p50 / {ms(poll['p99'])} ms p99 each: the rule times are the end of the first poll "
            "that saw the change (upper bounds by up to one poll). Connections through the gateway were opened from "
            "the client namespace every ~2 ms, each answered with the container's host name.\n"
        )
        out.append(
            f"While tasks left: {tr['leave_failed_connections']} of {tr['leave_connections']} connections through the "
            f"gateway failed (from the scale call to 1 s after the rule was gone), in "
            f"{tr['leave_trials_with_failures']} of {tr['leave']['call_to_rule_gone_s']['n']} trials.\n"
        )
        if tr.get("router_cpu"):
            cpu = tr["router_cpu"]
            out.append(
                f"The tcprouter daemon used {cpu['cpu_s']:.1f} s of CPU over the {cpu['wall_s']:.0f} s of trials "
                f"({100 * cpu['cpu_s'] / cpu['wall_s']:.1f} % of one core: task listings, probes, syncs).\n"
            )
        metric = tr["event_to_rules_metric"]
        if metric["count"]:
            out.append(
                f"The daemon's tcprouter_event_to_rules_seconds over the trials ({metric['count']:.0f} observations: "
                f"from a task's running timestamp, or the listing that saw it leave, to its rules written): mean "
                f"{metric['mean_s'] * 1000:.1f} ms, p50 <= {metric['p50_at_most_s'] * 1000:g} ms, p99 <= "
                f"{metric['p99_at_most_s'] * 1000:g} ms (bucket bounds).\n"
            )
        if tr.get("failures"):
            out.append("Failures: " + "; ".join(tr["failures"]) + "\n")
        if tr.get("router_warnings"):
            out.append(f"tcprouter logged {len(tr['router_warnings'])} warnings: {tr['router_warnings'][:3]}\n")
    return out
