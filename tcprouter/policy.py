"""Who may claim a frontend port: the operator's port policy (`--ports`) and pool ownership (`--owner-label`).

Pure: labels.desired_state applies it, in the order of the containers' ages, so that the decision is the same
whatever order Docker lists them in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPOSE_OWNER_LABEL = "com.docker.compose.project"  # the default owner of a frontend: its oldest backend's project
STACK_OWNER_LABEL = "com.docker.stack.namespace"  # the same for Swarm stacks (--swarm)
_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


@dataclass(frozen=True)
class PortSet:
    """Ports as ranges, as the operator wrote them (`1883,8000-8100,27017`)."""

    ranges: tuple[range, ...]

    def __contains__(self, port: object) -> bool:
        return any(port in r for r in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}" for r in self.ranges)


def parse_ports(text: str) -> PortSet:
    """`1883,8000-8100,27017` -> PortSet; ValueError naming the part that is not a port or a range of ports."""
    ranges = []
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"{part.strip()!r} is not a port or a range of ports LOW-HIGH within 1-65535")
        ranges.append(range(low, high + 1))
    return PortSet(tuple(ranges))


@dataclass(frozen=True)
class Policy:
    """What a container may claim, beyond its own labels being valid."""

    allowed_ports: PortSet | None = None  # None: every port
    owner_label: str = ""  # the label whose value owns a frontend ("": no ownership, any container may join)

    def owner(self, labels: dict[str, str]) -> str:
        """The owner a container belongs to; one without the label belongs to the owner ""."""
        return labels.get(self.owner_label, "") if self.owner_label else ""


DEFAULT_POLICY = Policy()  # every port, no ownership


def owner_text(owner: str) -> str:
    return repr(owner) if owner else "unset"
