"""What several commands derive from the flags: the flavour, the writer, the mode, the compiler options."""

from __future__ import annotations

import argparse
import logging

from ..compiler import Options, Synproxy
from ..daemon import Mode, build_providers, resolve_mode
from ..labels import LabelKeys
from ..metrics import Metrics
from ..model import ContainerSnapshot, Family, family_of
from ..netfilter import Flavour, Writer, detect_flavour, ipv6_available, open_writer
from ..policy import COMPOSE_OWNER_LABEL, STACK_OWNER_LABEL, Policy


def flavour(args: argparse.Namespace) -> Flavour:
    return detect_flavour() if args.flavour == "auto" else Flavour(args.flavour)


log = logging.getLogger("tcprouter")


def families(args: argparse.Namespace, flavour: Flavour) -> list[Family]:
    """The address families to route: the --listen-address's only; else IPv4, and IPv6 too in local mode unless
    --ipv6 off, or unless Docker does not program this host's ip6tables (then a warning says why)."""
    if args.listen_address:
        return [family_of(args.listen_address)]
    if args.ipv6 == "off" or mode(args) is not Mode.LOCAL:
        return [Family.IPV4]
    problem = ipv6_available(flavour)
    if problem:
        log.warning("IPv4 only, no IPv6 rules: %s", problem)
        return [Family.IPV4]
    return [Family.IPV4, Family.IPV6]


def writers(args: argparse.Namespace) -> dict[Family, Writer]:
    """One writer per address family routed, of the same flavour (Docker's)."""
    chosen = flavour(args)
    return {family: open_writer(args.writer, chosen, family) for family in families(args, chosen)}


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
        nat_tables=args.nat == "nftables",
    )


def policy(args: argparse.Namespace) -> Policy:
    """--ports and --owner-label; a frontend's owner is by default its oldest backend's Compose project, or
    its Swarm stack with --swarm."""
    owner_label = args.owner_label
    if owner_label is None:
        owner_label = STACK_OWNER_LABEL if mode(args) is Mode.SWARM else COMPOSE_OWNER_LABEL
    return Policy(allowed_ports=args.ports, owner_label=owner_label)


def label_keys(args: argparse.Namespace) -> LabelKeys:
    """The labels the providers keep of each container: the prefixes' and the owner label."""
    return LabelKeys(args.label_prefix, args.udp_label_prefix, policy(args).owner_label)


def listed(args: argparse.Namespace) -> list[ContainerSnapshot]:
    """One listing of every source's labelled containers (or tasks)."""
    metrics = Metrics(lambda: ({}, []))
    providers = build_providers(mode(args), args.docker_url, label_keys(args), metrics)
    return [snapshot for provider in providers for snapshot in provider.list()]
