"""Where backends come from. A provider turns one source (this host's engine, other engines, a Swarm
manager) into container snapshots and changes, sent to a sink; nothing after it knows which one fed it.

- `local`: this host's engine; containers reached at their address on a Docker network.
- `engines`: other hosts' engines; containers reached at the engine host's address and a published port.
- `swarm`: a Swarm manager; services' running tasks reached at their node's address and a published port.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from ..model import ContainerSnapshot
from ..tracker import Item

Sink = Callable[[Item], None]


class Provider(Protocol):
    @property
    def source(self) -> str:
        """A short name for logs and metrics (`local`, `swarm`, an engine's URL)."""
        ...

    @property
    def remote(self) -> bool:
        """Whether its backends live on other hosts (and so need probing and masquerading)."""
        ...

    def list(self) -> list[ContainerSnapshot]:
        """One listing of the labelled containers (for `status` and `render`); raises if the source is away."""
        ...

    def follow(self, sink: Sink, stopping: threading.Event) -> None:
        """Send a Relist, then every change, to `sink` until `stopping` is set; reconnect as needed; never raise."""
        ...
