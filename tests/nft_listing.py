"""What `nft -j list ruleset` shows of tcprouter's slot maps, read the slow, obvious way: the reference the netlink
reader (tcprouter/nftnat_read.py) and the metrics are checked against."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Mapping
from typing import Any

from tcprouter.compiler import destination, frontend_chain, save_string
from tcprouter.diff import SavedRule
from tcprouter.model import Family, Protocol
from tcprouter.nftnat import TABLE_PREFIX, nft_family

_SLOTS_MAP = re.compile(r"slots-(tcp|udp)-([0-9]+)")


def rules_of_listing(listing: Mapping[str, Any]) -> list[tuple[str, SavedRule]]:
    """The slot maps of tcprouter's tables in `nft -j list ruleset`'s answer, as the DNAT rules iptables would hold
    for them: table nat, chain TCPR-FE-<port> (TCPR-UDP-<port>), the backend's name as comment, the slot's counter
    as packets, in slot order. What the metrics and `status` read of the kernel, whichever side holds the nat."""
    rules: list[tuple[str, SavedRule]] = []
    for item in listing.get("nftables", []):
        found = item.get("map") if isinstance(item, dict) else None
        ours = found is not None and found.get("table", "").startswith(TABLE_PREFIX)
        name = _SLOTS_MAP.fullmatch(found.get("name", "")) if found and ours else None
        if found is None or name is None:
            continue
        protocol, port = Protocol(name.group(1)), int(name.group(2))
        chain = frontend_chain(port, protocol)
        slots = []
        for key, value in found.get("elem", []):  # [{"elem": {"val": slot, "comment": ..., "counter": ...}}, target]
            element = key.get("elem", {}) if isinstance(key, dict) else {}
            address, target_port = value["concat"]
            slots.append((element.get("val", 0), element, address, target_port))
        for _, element, address, target_port in sorted(slots, key=lambda slot: slot[0]):
            spec = (
                f"-p {protocol} -m comment --comment {save_string(element.get('comment', ''))} "
                f"-j DNAT --to-destination {destination(address, target_port)}"
            )
            rules.append(("nat", SavedRule(chain, spec, element.get("counter", {}).get("packets", 0))))
    return rules


def listing(netns: str, family: Family) -> dict:
    """`nft -j list ruleset` of `family`'s tables in namespace `netns`."""
    command = ["ip", "netns", "exec", netns, "nft", "-j", "list", "ruleset", nft_family(family)]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout or "{}")
