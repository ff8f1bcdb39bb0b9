"""Benchmark-only launcher: `tcprouter run` with another event-batching window (Timing.max_delay and
settle), to measure what that design change would buy. The main figures always use the real daemon.

Usage: python -m benchlib.router_variant MAX_DELAY SETTLE run [tcprouter run arguments...]
"""

from __future__ import annotations

import sys

from tcprouter import cli
from tcprouter.commands import run
from tcprouter.runner import Timing


def main() -> int:
    max_delay, settle = float(sys.argv[1]), float(sys.argv[2])

    def timing(*args: object, **kwargs: object) -> Timing:
        return Timing(*args, **{"max_delay": max_delay, "settle": settle, **kwargs})  # type: ignore[arg-type]

    run.Timing = timing  # type: ignore[assignment,misc]
    return cli.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
