"""Flavour detection on its own, against real tables: private network namespaces where Docker's chains are in
one flavour, both or none (the detection runs in a thread that joined the namespace, as do the iptables
commands it starts)."""

from __future__ import annotations

import pytest

from tcprouter.netfilter import Flavour, NetfilterError, detect_flavour, flavours_on_path

from .support import in_netns, private_netns, sh

pytestmark = pytest.mark.kernel
AVAILABLE = flavours_on_path()
DEFAULT = AVAILABLE[0] if AVAILABLE else None  # the flavour `iptables` points to
OTHER = next((f for f in AVAILABLE[1:]), None)


def _detect_with_docker_chains_in(*flavours: Flavour) -> Flavour:
    with private_netns() as ns:
        for flavour in flavours:
            sh("ip", "netns", "exec", ns, f"iptables-{flavour}", "-t", "filter", "-N", "DOCKER-USER")
        return in_netns(ns, detect_flavour)


def test_the_default_flavour_is_the_one_iptables_points_to():
    version = sh("iptables", "-V")
    assert DEFAULT is (Flavour.LEGACY if "legacy" in version else Flavour.NFT)


def test_without_docker_chains_the_default_flavour():
    assert _detect_with_docker_chains_in() is DEFAULT


def test_docker_chains_in_the_default_flavour():
    assert _detect_with_docker_chains_in(DEFAULT) is DEFAULT


@pytest.mark.skipif(OTHER is None, reason="only one iptables flavour on this host")
def test_docker_chains_in_the_other_flavour_only():
    assert _detect_with_docker_chains_in(OTHER) is OTHER


@pytest.mark.skipif(OTHER is None, reason="only one iptables flavour on this host")
def test_docker_chains_in_both_flavours_the_default_wins():
    assert _detect_with_docker_chains_in(OTHER, DEFAULT) is DEFAULT


def test_no_iptables_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert flavours_on_path() == []
    with pytest.raises(NetfilterError, match="no iptables-nft-restore or iptables-legacy-restore on PATH"):
        detect_flavour()
