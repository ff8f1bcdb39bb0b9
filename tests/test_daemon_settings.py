"""`tcprouter run` and `cleanup` in a private network namespace (their own tables, their own
net.ipv4.conf.all.route_localnet, their own ports), following the real Docker engine read-only with a label
prefix no container has: --route-localhost's sysctl is given back by `cleanup`, even across a restart of the
daemon, and --metrics-address (or its variable) decides whether an endpoint listens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tcprouter.hostports import proc_net_endpoint
from tcprouter.netfilter import flavours_on_path

from .support import REPO, private_netns, sh, unique, wait_until

pytestmark = pytest.mark.e2e
FLAVOUR = flavours_on_path()[0]


def owned_chains(ns: str, *table: str) -> list[str]:
    saved = sh("ip", "netns", "exec", ns, f"iptables-{FLAVOUR}-save", *(("-t", *table) if table else ()))
    return [line.split()[0][1:] for line in saved.splitlines() if line.startswith(":TCPR-")]


def route_localnet(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.conf.all.route_localnet").strip()


def tcprouter_in(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-m", "tcprouter", *args]


@contextmanager
def daemon(ns: str, *args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`tcprouter run` in the namespace, after its first sync; stopped by its PID. An earlier daemon's nat canary
    is deleted first: the first sync writes it back, in the same commit as every other chain it rewrites."""
    sh("ip", "netns", "exec", ns, f"iptables-{FLAVOUR}", "-t", "nat", "-X", "TCPR-CANARY", check=False)
    command = tcprouter_in(ns, "run", "--label-prefix", unique("tcpr-none-"), *args)
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        synced = lambda: "TCPR-CANARY" in owned_chains(ns, "nat") or process.poll() is not None  # noqa: E731
        wait_until(synced, 20, what="first sync")
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(20)


def cleanup(ns: str) -> None:
    subprocess.run(tcprouter_in(ns, "cleanup"), cwd=REPO, check=True, capture_output=True, timeout=60)


@pytest.mark.parametrize("before", ["0", "1"])
def test_cleanup_gives_route_localnet_back_the_value_found_before_even_after_a_restart(before: str):
    with private_netns() as ns:
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.conf.all.route_localnet={before}")
        for _ in range(2):  # the second daemon finds route_localnet=1, set by the first: it must not record that
            with daemon(ns, "--route-localhost", "--metrics-address", ""):
                assert route_localnet(ns) == "1" and "TCPR-INPUT" in owned_chains(ns)
            assert route_localnet(ns) == "1"  # the rules stay when the daemon stops, so does the sysctl
        cleanup(ns)
        assert (route_localnet(ns), owned_chains(ns)) == (before, [])


def test_a_run_without_route_localhost_gives_it_back_too():
    with private_netns() as ns:
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.conf.all.route_localnet=0")
        with daemon(ns, "--route-localhost", "--metrics-address", ""):
            assert route_localnet(ns) == "1"
        with daemon(ns, "--metrics-address", ""):
            assert (route_localnet(ns), "TCPR-INPUT" in owned_chains(ns)) == ("0", False)
        cleanup(ns)


def listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses listening in the network namespace of `pid` (ours: only the daemon runs there)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            if state == "0A":  # TCP_LISTEN
                address, port = proc_net_endpoint(local)
                found.add((str(address), port))
    return found


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {}, {("0.0.0.0", 9105)}),
        (("--metrics-address", ""), {}, set()),
        ((), {"TCPROUTER_METRICS_ADDRESS": ""}, set()),
        ((), {"TCPROUTER_METRICS_ADDRESS": "127.0.0.1:9200"}, {("127.0.0.1", 9200)}),
    ],
    ids=["default", "flag-empty", "variable-empty", "variable-address"],
)
def test_metrics_endpoint_listens_where_asked_and_not_at_all_for_an_empty_address(args, env, expected):
    with private_netns() as ns:
        try:
            with daemon(ns, *args, env=env) as process:
                assert listening(process.pid) == expected
        finally:
            cleanup(ns)
