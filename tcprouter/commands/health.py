"""`tcprouter health`: the daemon's /healthz, for the image's HEALTHCHECK."""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request


def command(args: argparse.Namespace) -> int:
    """The daemon's own verdict from /healthz on its metrics address (a wildcard host is asked on loopback)."""
    if not args.metrics_address:
        print("no metrics endpoint (--metrics-address ''): nothing to ask")
        return 0
    host, _, port = args.metrics_address.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as reply:
            print(reply.read().decode().strip())
            return 0
    except urllib.error.HTTPError as error:
        print(f"unhealthy: {error.read().decode().strip()}")
    except OSError as error:
        print(f"no answer from http://{host}:{port}/healthz: {error}")
    return 1
