"""What several commands derive from the flags: the flavour, the writer, the mode, the compiler options."""

from __future__ import annotations

import argparse

from ..compiler import Options, Synproxy
from ..daemon import Mode, build_providers, resolve_mode
from ..metrics import Metrics
from ..model import ContainerSnapshot
from ..netfilter import Flavour, Writer, detect_flavour, open_writer
from ..policy import COMPOSE_OWNER_LABEL, STACK_OWNER_LABEL, Policy


def flavour(args: argparse.Namespace) -> Flavour:
    return detect_flavour() if args.flavour == "auto" else Flavour(args.flavour)


def writer(args: argparse.Namespace) -> Writer:
    return open_writer(args.writer, flavour(args))


def mode(args: argparse.Namespace) -> Mode:
    return resolve_mode(args.provider, args.docker_url)


def options(args: argparse.Namespace) -> Options:
    snat_always = args.snat == "always" or (args.snat == "auto" and mode(args) is not Mode.LOCAL)
    return Options(
        mark_bit=args.mark_bit,
        listen_address=args.listen_address,
        snat_always=snat_always,
        route_localhost=args.route_localhost,
        synproxy=Synproxy.ALL if args.synproxy else Synproxy.LABEL,
        policy=policy(args),
    )


def policy(args: argparse.Namespace) -> Policy:
    """--ports and --owner-label; a frontend's owner is by default its oldest backend's Compose project, or
    its Swarm stack with --swarm."""
    owner_label = args.owner_label
    if owner_label is None:
        owner_label = STACK_OWNER_LABEL if mode(args) is Mode.SWARM else COMPOSE_OWNER_LABEL
    return Policy(allowed_ports=args.ports, owner_label=owner_label)


def listed(args: argparse.Namespace) -> list[ContainerSnapshot]:
    """One listing of every source's labelled containers (or tasks)."""
    metrics = Metrics(lambda: ({}, []))
    providers = build_providers(
        mode(args), args.docker_url, args.label_prefix, metrics, udp_prefix=args.udp_label_prefix
    )
    return [snapshot for provider in providers for snapshot in provider.list()]
