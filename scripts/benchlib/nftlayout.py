"""Rule layouts for N frontends x 10 backends: what a full load and a one-backend change cost in the kernel.

The question behind issue 14's missed targets (full sync <= 2 s, partial sync <= 30 ms at 10,000 x 10): does a
native nftables layout (kube-proxy's: a port verdict map, one chain per frontend with one `numgen` rule) get there,
and which form of it? Each layout is loaded into a private namespace of its own by the tool a writer would run
(iptables-nft-restore or nft -f), from empty tables (*full*), then one frontend's pool goes from 10 backends to 9
and back, rewritten the way that layout allows (*partial*, the writer process's wall time, median of the runs).

- iptables-nft: today's layout (TCPR-FE-<port> chains of 10 statistic/DNAT rules, flat dispatch), one nat table.
- nft-anon-T: T tables (ports split evenly), a vmap port -> goto chain, each chain one rule with an anonymous map
  `numgen inc mod n map { 0 : addr . port, ... }`; partial: flush the chain, add the rule.
- nft-named-T: as nft-anon-T, with the map a named one per frontend, a counter per element (per-backend connection
  counts, which the kernel updates on lookup); partial: flush the chain and the map, add elements and the rule.

Usage: python -m benchlib.nftlayout [FRONTENDS,... [RUNS]]   (from scripts/, as root; default 1000,10000 5)
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .common import median, netns_add, sh

BACKENDS = 10
FIRST_PORT = 20000
MARK = "0x100000"


def _address(frontend: int, backend: int) -> str:
    k = frontend * BACKENDS + backend
    return f"198.18.{k // 250 % 256}.{k % 250 + 1}"


def _pool(frontend: int, backends: int) -> list[str]:
    return [f"{_address(frontend, b)} . 8080" for b in range(backends)]


def _elements(addresses: list[str], counter: bool) -> str:
    tag = " counter" if counter else ""
    return ", ".join(f"{slot}{tag} : {address}" for slot, address in enumerate(addresses))


@dataclass(frozen=True)
class NftLayout:
    tables: int
    named: bool

    @property
    def name(self) -> str:
        return f"nft-{'named' if self.named else 'anon'}-{self.tables}"

    def _table_of(self, frontend: int, frontends: int) -> int:
        return frontend * self.tables // frontends

    def _rule(self, frontend: int, addresses: list[str]) -> str:
        port = FIRST_PORT + frontend
        target = f"@b{port}" if self.named else "{ " + _elements(addresses, counter=False) + " }"
        return (
            f"meta l4proto tcp ct mark set ct mark or {MARK} "
            f"dnat ip addr . port to numgen inc mod {len(addresses)} map {target}"
        )

    def full(self, frontends: int) -> str:
        lines = []
        for table in range(self.tables):
            members = [f for f in range(frontends) if self._table_of(f, frontends) == table]
            lines += [
                f"table ip tcpr{table} {{",
                "  map frontends { type inet_service : verdict; }",
                "  chain prerouting { type nat hook prerouting priority -101; policy accept; "
                "fib daddr type local tcp dport vmap @frontends; }",
            ]
            for frontend in members:
                port, addresses = FIRST_PORT + frontend, _pool(frontend, BACKENDS)
                if self.named:
                    lines.append(
                        f"  map b{port} {{ typeof numgen inc mod 2 : ip daddr . tcp dport; counter; "
                        f"elements = {{ {_elements(addresses, counter=True)} }} }}"
                    )
                lines.append(f"  chain fe{port} {{ {self._rule(frontend, addresses)}; }}")
            lines.append("}")
            if members:
                verdicts = ", ".join(f"{FIRST_PORT + f} : goto fe{FIRST_PORT + f}" for f in members)
                lines.append(f"add element ip tcpr{table} frontends {{ {verdicts} }}")
        return "\n".join(lines) + "\n"

    def partial(self, frontend: int, frontends: int, backends: int) -> str:
        table, port, addresses = self._table_of(frontend, frontends), FIRST_PORT + frontend, _pool(frontend, backends)
        lines = [f"flush chain ip tcpr{table} fe{port}"]
        if self.named:
            lines += [
                f"flush map ip tcpr{table} b{port}",
                f"add element ip tcpr{table} b{port} {{ {_elements(addresses, counter=True)} }}",
            ]
        lines.append(f"add rule ip tcpr{table} fe{port} {self._rule(frontend, addresses)}")
        return "\n".join(lines) + "\n"

    def load(self, netns: str, text: str) -> None:
        sh("ip", "netns", "exec", netns, "nft", "-f", "-", input=text, timeout=600)


class IptablesLayout:
    name = "iptables-nft"

    @staticmethod
    def _chain(frontend: int, backends: int) -> list[str]:
        port = FIRST_PORT + frontend
        rules = []
        for b, address in enumerate(_address(frontend, b) for b in range(backends)):
            every = f"-m statistic --mode nth --every {backends - b} --packet 0 " if b < backends - 1 else ""
            rules.append(f"-A TCPR-FE-{port} -p tcp {every}-j DNAT --to-destination {address}:8080")
        return rules

    def full(self, frontends: int) -> str:
        ports = [FIRST_PORT + f for f in range(frontends)]
        lines = ["*nat", ":TCPR-FRONTENDS - [0:0]"] + [f":TCPR-FE-{p} - [0:0]" for p in ports]
        lines.append("-A PREROUTING -m addrtype --dst-type LOCAL -j TCPR-FRONTENDS")
        lines += [f"-A TCPR-FRONTENDS -p tcp --dport {p} -j TCPR-FE-{p}" for p in ports]
        for frontend in range(frontends):
            lines += self._chain(frontend, BACKENDS)
        return "\n".join([*lines, "COMMIT"]) + "\n"

    def partial(self, frontend: int, frontends: int, backends: int) -> str:
        port = FIRST_PORT + frontend
        return "\n".join(["*nat", f":TCPR-FE-{port} - [0:0]", *self._chain(frontend, backends), "COMMIT"]) + "\n"

    def load(self, netns: str, text: str) -> None:
        sh("ip", "netns", "exec", netns, "iptables-nft-restore", "--noflush", input=text, timeout=600)


LAYOUTS = [
    IptablesLayout(),
    NftLayout(tables=1, named=False),
    NftLayout(tables=1, named=True),
    NftLayout(tables=64, named=False),
    NftLayout(tables=64, named=True),
]


def _seconds(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(layout: NftLayout | IptablesLayout, frontends: int, runs: int) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        netns = netns_add(stack, "tbl")
        full_text = layout.full(frontends)
        full = _seconds(lambda: layout.load(netns, full_text))
        victim = frontends // 2
        partial = []
        for run in range(2 * runs):  # 10 -> 9 backends, then back
            text = layout.partial(victim, frontends, BACKENDS - 1 if run % 2 == 0 else BACKENDS)
            partial.append(_seconds(lambda text=text: layout.load(netns, text)))
        return {"full_s": full, "partial_ms_p50": median(partial) * 1e3, "partial_ms_max": max(partial) * 1e3}


def main(argv: list[str]) -> None:
    sizes = [int(n) for n in (argv[0] if argv else "1000,10000").split(",")]
    runs = int(argv[1]) if len(argv) > 1 else 5
    print(f"| layout | {' | '.join(f'{n:,} x {BACKENDS}: full s / partial ms p50 (max)' for n in sizes)} |")
    print(f"|---|{'---|' * len(sizes)}")
    for layout in LAYOUTS:
        cells = []
        for frontends in sizes:
            figures = measure(layout, frontends, runs)
            cells.append(f"{figures['full_s']:.2f} / {figures['partial_ms_p50']:.0f} ({figures['partial_ms_max']:.0f})")
        print(f"| {layout.name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
