"""Per-frontend access labels (tcp.allow, tcp.maxconn, tcp.rate, tcp.burst, tcp.synproxy): validation, pooling, and the
rules they compile to, which the kernel must accept (private network namespaces)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcprouter.compiler import Options, Synproxy, compile_rules
from tcprouter.diff import restore_script
from tcprouter.labels import LabelError, desired_state, parse_access
from tcprouter.model import Access
from tcprouter.netfilter import Flavour, Iptables

from .strategies import container
from .support import private_netns, sh

FLAVOURS = [f for f in Flavour if sh("sh", "-c", f"command -v iptables-{f}-restore", check=False)]
ACCESS_REASONS = {"invalid_allow", "invalid_maxconn", "invalid_rate", "invalid_burst", "invalid_synproxy"}


@pytest.mark.parametrize(
    ("labels", "access"),
    [
        ({}, Access()),
        ({"tcp.allow": "10.1.2.3/16, 192.0.2.7,10.1.0.0/16"}, Access(allow=("10.1.0.0/16", "192.0.2.7/32"))),
        ({"tcp.allow": "10.0.0.0/8,0.0.0.0/0"}, Access()),  # everyone, said twice
        ({"tcp.allow": "2001:DB8:0::1/32,10.0.0.0/8"}, Access(allow=("2001:db8::/32", "10.0.0.0/8"))),
        ({"tcp.allow": "::/0"}, Access()),
        ({"tcp.maxconn": "2"}, Access(maxconn=2)),
        ({"tcp.rate": "10/s"}, Access(rate=10)),
        ({"tcp.rate": " 10/s ", "tcp.burst": "20"}, Access(rate=10, burst=20)),
    ],
)
def test_access_labels_are_read_and_normalised(labels, access):
    assert parse_access(labels) == access


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({"tcp.allow": ""}, "invalid_allow"),
        ({"tcp.allow": "10.0.0.0/8,"}, "invalid_allow"),
        ({"tcp.allow": "10.0.0.0/33"}, "invalid_allow"),
        ({"tcp.allow": "2001:db8::/129"}, "invalid_allow"),
        ({"tcp.allow": "example.com"}, "invalid_allow"),
        ({"tcp.allow": ",".join(f"10.0.{i}.0/24" for i in range(65))}, "invalid_allow"),
        ({"tcp.maxconn": "0"}, "invalid_maxconn"),
        ({"tcp.maxconn": "two"}, "invalid_maxconn"),
        ({"tcp.rate": "10"}, "invalid_rate"),
        ({"tcp.rate": "10/m"}, "invalid_rate"),
        ({"tcp.rate": "0/s"}, "invalid_rate"),
        ({"tcp.rate": "100001/s"}, "invalid_rate"),
        ({"tcp.rate": "5/s", "tcp.burst": "0"}, "invalid_burst"),
        ({"tcp.burst": "5"}, "invalid_burst"),  # a burst of what rate?
    ],
)
def test_bad_access_labels_reject_the_container_with_a_named_reason(labels, reason):
    with pytest.raises(LabelError) as raised:
        parse_access(labels)
    assert raised.value.reason == reason
    state = desired_state([container(1, labels={"tcp.port": "80", **labels})])
    assert [r.reason for r in state.rejections] == [reason]
    assert 80 not in state.frontends


def test_the_oldest_backends_access_wins_as_a_whole_and_a_disagreement_is_reported():
    oldest = container(1, labels={"tcp.port": "80", "tcp.allow": "10.1.0.0/16"})
    newer = container(2, labels={"tcp.port": "80", "tcp.maxconn": "100"})  # cannot open the frontend up
    state = desired_state([newer, oldest])
    assert state.frontends[80].access == Access(allow=("10.1.0.0/16",))
    assert [b.name for b in state.frontends[80].backends] == ["c1", "c2"]
    assert len(state.warnings) == 1 and "c2" in state.warnings[0] and "c1" in state.warnings[0]
    # When the oldest leaves, the next oldest's settings take over: the pool follows its members.
    assert desired_state([newer]).frontends[80].access == Access(maxconn=100)


access_values = st.one_of(
    st.text(max_size=6),
    st.integers(min_value=-2, max_value=200_000).map(str),
    st.integers(min_value=-2, max_value=200_000).map(lambda n: f"{n}/s"),
    st.lists(
        st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 40)).map(
            lambda t: f"{t[0]}.{t[1]}.0.0/{t[2]}"
        ),
        min_size=0,
        max_size=3,
    ).map(",".join),
    st.sampled_from(["10/s", "0.0.0.0/0", "1", "65535", "10000", "100000/s", "5/m", "true", "False", "yes"]),
)
access_labels = st.dictionaries(
    st.sampled_from(["tcp.allow", "tcp.maxconn", "tcp.rate", "tcp.burst", "tcp.synproxy"]), access_values
)


@pytest.mark.kernel
@pytest.mark.parametrize("flavour", FLAVOURS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=access_labels, second=access_labels, synproxy=st.sampled_from(Synproxy))
def test_any_access_labels_compile_to_rules_the_kernel_accepts_or_are_rejected_with_a_reason(
    flavour, first, second, synproxy
):
    """Nothing in between: a container is either in its pool, with rules iptables-restore takes, or rejected."""
    containers = [
        container(1, labels={"tcp.port": "80", **first}),
        container(2, labels={"tcp.port": "81", **second}, networks={"bridge": "10.9.1.3"}),
    ]
    state = desired_state(containers)
    for snapshot, port in zip(containers, (80, 81), strict=True):
        rejected = [r.reason for r in state.rejections if r.container_id == snapshot.id]
        assert rejected == [] if port in state.frontends else rejected and rejected[0] in ACCESS_REASONS
    with private_netns() as ns:
        iptables = Iptables(Flavour(flavour), netns=ns)
        script = restore_script({}, compile_rules(state, Options(forward_parent="FORWARD", synproxy=synproxy)))
        iptables.restore(script, test=True)
        iptables.restore(script)  # and the kernel's own checks of each match (legacy --test skips them)
