"""The rule compiler and the restore diff (pure, fast), checked by simulating the statistic match."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcprouter.compiler import (
    BUCKET_SIZE,
    DISPATCH_LEVELS,
    FLAT_DISPATCH_MAX,
    Options,
    RuleSet,
    Synproxy,
    access_bit,
    access_rules,
    bucket_chain,
    compile_rules,
    dispatch_chain,
    dispatch_range_size,
    frontend_chain,
    frontend_of,
    frontend_port,
    hashlimit_rate,
    is_bucket_chain,
    pool_rules,
    refusal,
    rotation,
    rule_comment,
    save_string,
    split_words,
)
from tcprouter.diff import believed_tables, hook_in_place, owned_only, parse_save, restore_script
from tcprouter.model import Access, Backend, Balance, DesiredState, Frontend, Protocol

from .strategies import backends, desired_states, ports

MARK = "0x100000/0x100000"


def backend(i: int, weight: int = 1) -> Backend:
    return Backend(f"{i:064x}", f"b{i}", f"172.17.0.{i + 1}", 1234, weight, "172.17.0.0/16")


class NthPool:
    """The kernel's per-rule nth counters (xt_statistic: a rule with --every N matches its 1st, (N+1)th, ...
    evaluation), the `! -s` skip before the statistic match, and the DNAT target: a model of the chain."""

    def __init__(self, rules: tuple[str, ...]) -> None:
        self.rules = [r for r in rules if "-j DNAT" in r]
        self.counters = [0] * len(self.rules)

    def route(self, source: str = "198.51.100.2") -> str | None:
        for i, rule in enumerate(self.rules):
            skip = re.search(r"! -s (\S+)/32", rule)
            only = re.match(r"-s (\S+)/32", rule)
            if (skip and skip.group(1) == source) or (only and only.group(1) != source):
                continue
            every = re.search(r"--every (\d+)", rule)
            if every:
                hit = self.counters[i] % int(every.group(1)) == 0
                self.counters[i] += 1
                if not hit:
                    continue
            return re.search(r"--to-destination (\S+):", rule).group(1)
        return None


def test_seed_layout_for_three_backends():
    rules = pool_rules(Frontend(27017, Balance.ROUNDROBIN, (backend(1), backend(2), backend(3))), MARK)
    assert rules == (
        f"-j CONNMARK --set-xmark {MARK}",
        "! -s 172.17.0.2/32 -p tcp -m comment --comment b1 -m statistic --mode nth --every 3 --packet 0 "
        "-j DNAT --to-destination 172.17.0.2:1234",
        "! -s 172.17.0.3/32 -p tcp -m comment --comment b2 -m statistic --mode nth --every 2 --packet 0 "
        "-j DNAT --to-destination 172.17.0.3:1234",
        "! -s 172.17.0.4/32 -p tcp -m comment --comment b3 -j DNAT --to-destination 172.17.0.4:1234",
        "-s 172.17.0.4/32 -p tcp -m comment --comment b1 -j DNAT --to-destination 172.17.0.2:1234",
    )
    pool = NthPool(rules)
    assert [pool.route() for _ in range(6)] == ["172.17.0.2", "172.17.0.3", "172.17.0.4"] * 2


def test_smooth_weighted_rotation():
    a, b = backend(1, 1), backend(2, 2)
    assert rotation([a, b]) == [b, a, b]
    assert rotation([backend(1)]) == [backend(1)]


@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=8, unique=True), st.integers(0, 7), st.integers(1, 3))
def test_a_rotation_holds_each_backend_weight_times_in_pool_order_when_unweighted(ids, heavy, weight):
    pool = [backend(i) for i in ids]
    assert rotation(pool) == pool
    weighted = [b._replace(weight=weight) if n == heavy else b for n, b in enumerate(pool)]
    assert Counter(rotation(weighted)) == Counter({b: b.weight for b in weighted})


@given(
    st.lists(st.integers(1, 10_000), min_size=1, max_size=6, unique=True).flatmap(
        lambda ids: st.tuples(*(backends(i) for i in ids))
    ),
    st.integers(1, 3),
)
def test_nth_rotation_is_exact_for_any_weights(pool, rounds):
    frontend = Frontend(80, Balance.ROUNDROBIN, pool)
    period = sum(b.weight for b in pool)
    router = NthPool(pool_rules(frontend, MARK))
    got = Counter(router.route() for _ in range(period * rounds))
    assert got == Counter({b.ip: b.weight * rounds for b in pool})


@given(
    st.lists(st.integers(1, 10_000), min_size=2, max_size=5, unique=True).flatmap(
        lambda ids: st.tuples(*(backends(i) for i in ids))
    )
)
def test_a_backend_is_never_sent_to_itself_and_others_see_no_change(pool):
    frontend = Frontend(80, Balance.ROUNDROBIN, pool)
    period = sum(b.weight for b in pool)
    router = NthPool(pool_rules(frontend, MARK))
    for member in pool:
        assert router.route(member.ip) not in (None, member.ip)
    reference = NthPool(pool_rules(frontend, MARK))
    assert Counter(router.route() for _ in range(period)) == Counter(reference.route() for _ in range(period))


def test_lone_backend_never_gets_its_own_connection():
    rules = pool_rules(Frontend(80, Balance.ROUNDROBIN, (backend(1),)), MARK)
    assert NthPool(rules).route("172.17.0.2") is None  # falls through to the host: refused, not hung
    assert NthPool(rules).route() == "172.17.0.2"


@given(
    st.lists(st.integers(1, 10_000), min_size=1, max_size=6, unique=True).flatmap(
        lambda ids: st.tuples(*(backends(i) for i in ids))
    )
)
def test_random_mode_probabilities_give_weight_shares(pool):
    rules = [r for r in pool_rules(Frontend(80, Balance.RANDOM, pool), MARK) if "-j DNAT" in r and "! -s" in r]
    total = sum(b.weight for b in pool)
    reach = 1.0
    for b, rule in zip(pool, rules, strict=True):
        p = float(re.search(r"--probability (\S+)", rule).group(1)) if "--probability" in rule else 1.0
        assert abs(reach * p - b.weight / total) < 1e-6
        reach *= 1 - p


def test_empty_pools_are_not_routed_and_hooks_are_in_place():
    state = DesiredState(
        {80: Frontend(80, Balance.ROUNDROBIN, ()), 81: Frontend(81, Balance.ROUNDROBIN, (backend(1),))}
    )
    rules = compile_rules(state)
    assert rules.chains["nat"]["TCPR-FRONTENDS"] == ("-p tcp -m tcp --dport 81 -j TCPR-FE-81",)
    assert "TCPR-FE-80" not in rules.chains["nat"]
    assert ("PREROUTING", "-m addrtype --dst-type LOCAL -j TCPR-FRONTENDS") in rules.hooks["nat"]
    assert ("DOCKER-USER", "-j TCPR-FORWARD") in rules.hooks["filter"]
    assert rules.chains["filter"]["TCPR-FORWARD"] == (
        "-m connmark --mark 0x100000/0x300000 -j ACCEPT",
        f"-m connmark --mark {MARK} -j ACCEPT",
        "-m conntrack --ctstate INVALID -j TCPR-INVALID",
    )
    # only INVALID packets from or to a backend's network are dropped, not the host's other forwarded traffic
    assert rules.chains["filter"]["TCPR-INVALID"] == (
        "-s 172.17.0.0/16 -p tcp -j DROP",
        "-d 172.17.0.0/16 -p tcp -j DROP",
    )
    assert "TCPR-ACCESS" not in rules.chains["filter"]


def test_synproxy_untracks_the_syns_of_its_frontends_and_proxies_them_in_input():
    state = DesiredState(
        {
            80: Frontend(80, Balance.ROUNDROBIN, (backend(1),), synproxy=True),
            81: Frontend(81, Balance.ROUNDROBIN, (backend(2),)),
            82: Frontend(82, Balance.ROUNDROBIN, (), synproxy=True),  # not routed: the host's
        }
    )
    rules = compile_rules(state, Options(tcp_loose_before=1))
    assert rules.chains["raw"] == {"TCPR-NOTRACK": ("-p tcp -m tcp --dport 80 -j CT --notrack",)}
    assert rules.hooks["raw"] == (
        ("PREROUTING", "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m addrtype --dst-type LOCAL -j TCPR-NOTRACK"),
    )
    assert rules.chains["filter"]["TCPR-INPUT"] == (
        "-p tcp -m conntrack --ctstate INVALID,UNTRACKED -m comment --comment tcp_loose-before-1 -j TCPR-SYNPROXY",
    )
    assert rules.chains["filter"]["TCPR-SYNPROXY"] == (
        "-p tcp -m tcp --dport 80 -j SYNPROXY --sack-perm --timestamp --wscale 7 --mss 1460",
        "-p tcp -m tcp --dport 80 -j DROP",
    )
    assert ("INPUT", "-j TCPR-INPUT") in rules.hooks["filter"]
    # --synproxy: every routed frontend; a listen address narrows the matches to it.
    everyone = compile_rules(state, Options(synproxy=Synproxy.ALL, listen_address="192.0.2.1"))
    assert everyone.chains["raw"]["TCPR-NOTRACK"] == (
        "-p tcp -m tcp --dport 80 -j CT --notrack",
        "-p tcp -m tcp --dport 81 -j CT --notrack",
    )
    assert everyone.hooks["raw"] == (
        ("PREROUTING", "-d 192.0.2.1/32 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j TCPR-NOTRACK"),
    )
    assert everyone.chains["filter"]["TCPR-SYNPROXY"][-1] == "-d 192.0.2.1/32 -p tcp -m tcp --dport 81 -j DROP"


def test_synproxy_for_every_frontend_leaves_udp_frontends_alone():
    udp = {5683: Frontend(5683, Balance.ROUNDROBIN, (backend(1),), protocol=Protocol.UDP)}
    rules = compile_rules(DesiredState({}, udp_frontends=udp), Options(synproxy=Synproxy.ALL))
    assert "raw" not in rules.chains and "TCPR-SYNPROXY" not in rules.chains["filter"]


@pytest.mark.parametrize("options", [Options(), Options(synproxy=Synproxy.OFF)])
def test_without_synproxy_frontends_or_with_synproxy_off_the_raw_table_is_not_used(options: Options):
    state = DesiredState(
        {80: Frontend(80, Balance.ROUNDROBIN, (backend(1),), synproxy=options.synproxy is Synproxy.OFF)}
    )
    rules = compile_rules(state, options)
    assert "raw" not in rules.chains and "raw" not in rules.hooks
    assert "TCPR-INPUT" not in rules.chains["filter"]


def test_access_labels_compile_to_checks_of_new_connections_of_that_frontend_only():
    guarded = Access(allow=("10.1.0.0/16", "192.0.2.7/32"), maxconn=2, rate=10, burst=20)
    state = DesiredState(
        {
            80: Frontend(80, Balance.ROUNDROBIN, (backend(1),), guarded),
            81: Frontend(81, Balance.ROUNDROBIN, (backend(2),)),
            82: Frontend(82, Balance.ROUNDROBIN, (), guarded),  # not routed: no checks either
        }
    )
    rules = compile_rules(state)
    nat, filter_ = rules.chains["nat"], rules.chains["filter"]
    assert nat["TCPR-FE-80"][0] == "-j CONNMARK --set-xmark 0x300000/0x300000"
    assert nat["TCPR-FE-81"][0] == f"-j CONNMARK --set-xmark {MARK}"
    assert filter_["TCPR-FORWARD"] == (
        "-m connmark --mark 0x100000/0x300000 -j ACCEPT",  # frontend 81: one rule, as without access labels
        "-m connmark --mark 0x300000/0x300000 -m conntrack --ctstate NEW -j TCPR-ACCESS",
        f"-m connmark --mark {MARK} -j ACCEPT",
        "-m conntrack --ctstate INVALID -j TCPR-INVALID",
    )
    assert filter_["TCPR-ACCESS"] == ("-m conntrack --ctorigdstport 80 -j TCPR-AC-80",)
    reject = "-j REJECT --reject-with tcp-reset"
    assert filter_["TCPR-AC-80"] == (
        "-j TCPR-AL-80",
        "-p tcp -m connlimit --connlimit-above 2 --connlimit-mask 32 --connlimit-saddr "
        f"-m comment --comment refused-80-maxconn {reject}",
        "-p tcp -m hashlimit --hashlimit-above 10/sec --hashlimit-burst 20 --hashlimit-mode srcip "
        f"--hashlimit-name tcpr-80-10-20 -m comment --comment refused-80-rate {reject}",
    )
    assert filter_["TCPR-AL-80"] == (
        "-s 10.1.0.0/16 -j RETURN",
        "-s 192.0.2.7/32 -j RETURN",
        f"-p tcp -m comment --comment refused-80-allow {reject}",
    )
    assert [refusal(rule) for rule in filter_["TCPR-AL-80"]] == [None, None, (80, "allow")]
    assert not {"TCPR-AC-81", "TCPR-AC-82", "TCPR-AL-82"} & set(filter_)


def test_rate_without_burst_takes_hashlimits_default_and_only_set_checks_appear():
    chains = access_rules(9000, Access(rate=3))
    assert chains == {
        "TCPR-AC-9000": (
            "-p tcp -m hashlimit --hashlimit-above 3/sec --hashlimit-burst 5 --hashlimit-mode srcip "
            "--hashlimit-name tcpr-9000-3-5 -m comment --comment refused-9000-rate -j REJECT --reject-with tcp-reset",
        )
    }


@pytest.mark.parametrize(("rate", "saved"), [(1, "1/sec"), (10, "10/sec"), (1105, "1106/sec"), (99999, "100000/sec")])
def test_a_rate_is_written_as_iptables_save_prints_it_back(rate, saved):
    """The kernel keeps 1,000,000 // rate microseconds between connections (the kernel tests load them all)."""
    assert hashlimit_rate(rate) == saved


@pytest.mark.parametrize(("mark_bit", "bit"), [(0x100000, 0x200000), (0x1, 0x2), (0x80000000, 0x40000000)])
def test_access_bit_is_the_neighbour_of_the_mark_bit(mark_bit, bit):
    assert access_bit(mark_bit) == bit


def test_options_listen_address_snat_and_mark():
    state = DesiredState({81: Frontend(81, Balance.ROUNDROBIN, (backend(1),))})
    rules = compile_rules(state, Options(mark_bit=0x4000, listen_address="192.0.2.7", snat_always=True))
    assert ("PREROUTING", "-d 192.0.2.7/32 -j TCPR-FRONTENDS") in rules.hooks["nat"]
    assert rules.chains["nat"]["TCPR-POSTROUTING"] == ("-m connmark --mark 0x4000/0x4000 -j MASQUERADE",)
    hairpin = compile_rules(state).chains["nat"]["TCPR-POSTROUTING"]
    assert hairpin == (f"-s 172.17.0.0/16 -d 172.17.0.0/16 -m connmark --mark {MARK} -j MASQUERADE",)


def test_one_backend_change_rewrites_one_frontend_chain():
    many = {
        port: Frontend(port, Balance.ROUNDROBIN, (backend(port % 200 + 1), backend(port % 200 + 2)))
        for port in range(1000, 1100)
    }
    before = compile_rules(DesiredState(many))
    changed = dict(many)
    changed[1050] = Frontend(1050, Balance.ROUNDROBIN, (*many[1050].backends, backend(240)))
    script = restore_script(believed_tables(before), compile_rules(DesiredState(changed)))
    assert script == "\n".join(
        [
            "*nat",
            ":TCPR-FE-1050 - [0:0]",
            *(f"-A TCPR-FE-1050 {r}" for r in pool_rules(changed[1050], MARK)),
            "COMMIT",
            "",
        ]
    )
    assert restore_script(believed_tables(before), before) == ""


@given(desired_states(), desired_states())
def test_diff_from_any_state_to_any_state_reaches_it(first, second):
    """Applying the script to a model of the kernel gives exactly the second rule set."""
    kernel = believed_tables(compile_rules(first))
    target = compile_rules(second)
    apply_script_to_model(kernel, restore_script(kernel, target))
    assert owned_only(kernel) == owned_only(believed_tables(target))  # a hook's emptied parent stays, as in the kernel


def apply_script_to_model(tables: dict, script: str) -> None:
    """A tiny model of iptables-restore --noflush for the operations restore_script emits."""
    table: dict = {}
    for line in script.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            table[line[1:].split()[0]] = ()
        elif line.startswith("-A "):
            chain, _, rule = line[3:].partition(" ")
            table[chain] = (*table[chain], rule)
        elif line.startswith("-I "):
            chain, _, rest = line[3:].partition(" ")
            position, _, rule = rest.partition(" ")
            rules = list(table.get(chain, ()))
            rules.insert(int(position) - 1, rule)
            table[chain] = tuple(rules)
        elif line.startswith("-D "):
            chain, _, rule = line[3:].partition(" ")
            rules = list(table[chain])
            rules.remove(rule)
            table[chain] = tuple(rules)
        elif line.startswith("-X "):
            del table[line[3:]]


def test_parse_save_reads_counters_and_chains():
    text = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:TCPR-FE-80 - [0:0]\n"
        "[7:420] -A TCPR-FE-80 -j DNAT --to-destination 1.2.3.4:80\nCOMMIT\n"
    )
    tables, counted = parse_save(text)
    assert tables == {"nat": {"PREROUTING": (), "TCPR-FE-80": ("-j DNAT --to-destination 1.2.3.4:80",)}}
    assert counted[0][1].packets == 7


def test_cleanup_script_touches_only_owned_objects():
    kernel = {
        "nat": {
            "PREROUTING": ("-j DOCKER", "-m addrtype --dst-type LOCAL -j TCPR-FRONTENDS"),
            "DOCKER": ("-j RETURN",),
            "TCPR-FRONTENDS": ("-j TCPR-FE-80",),
            "TCPR-FE-80": (),
        }
    }
    script = restore_script(kernel, RuleSet(chains={}))
    assert "DOCKER " not in script.replace("PREROUTING", "")
    assert "-D PREROUTING -m addrtype --dst-type LOCAL -j TCPR-FRONTENDS" in script
    assert {line for line in script.splitlines() if line.startswith("-X")} == {"-X TCPR-FRONTENDS", "-X TCPR-FE-80"}


@given(ports)
def test_a_frontend_chain_gives_back_its_port(port: int):
    assert frontend_port(frontend_chain(port)) == port


@pytest.mark.parametrize(
    "chain", ["TCPR-FRONTENDS", "TCPR-FE-", "TCPR-FE-080", "TCPR-FE-+80", "TCPR-FE-8 0", "TCPR-FE-\u0663", "FE-80"]
)
def test_other_chains_have_no_frontend_port(chain: str):
    assert frontend_port(chain) is None


@given(st.text())
def test_a_comment_reads_back_as_written(name: str):
    """Any backend name survives save_string's quoting (iptables-save's) and reading it back out of a rule,
    whatever follows it; the kernel side is test_writers' test_backend_names_survive_iptables_save."""
    assert split_words(f"-m comment --comment {save_string(name)}") == ["-m", "comment", "--comment", name]
    spec = f"! -s 172.17.0.2/32 -p tcp -m comment --comment {save_string(name)} -m statistic --mode nth"
    assert rule_comment(spec + " --every 2 --packet 0 -j DNAT --to-destination 172.17.0.2:1234") == name


@given(backends(1), backends(2), st.sampled_from(list(Balance)), st.booleans())
def test_a_frontend_s_kept_hash_follows_its_value(one: Backend, two: Backend, balance: Balance, synproxy: bool):
    """pool_rules' cache keys on frontends, whose hash is computed once, when built: equal frontends (built apart,
    or copied with a field changed) hash alike, and a changed field changes the hash."""

    def rebuilt(frontend: Frontend) -> Frontend:
        copies = tuple(b._replace() for b in frontend.backends)
        return Frontend(frontend.port, frontend.balance, copies, frontend.access, frontend.synproxy, frontend.protocol)

    frontend = Frontend(80, balance, (one, two), synproxy=synproxy)
    assert rebuilt(frontend) == frontend and hash(rebuilt(frontend)) == hash(frontend)
    for change in ({"port": 81}, {"synproxy": not synproxy}, {"access": Access(maxconn=1)}, {"protocol": Protocol.UDP}):
        other = dataclasses.replace(frontend, **change)
        assert other != frontend and hash(other) != hash(frontend) and hash(rebuilt(other)) == hash(other)


@given(backends(1))
def test_each_dnat_rule_names_its_backend(member: Backend):
    for rule in pool_rules(Frontend(80, Balance.ROUNDROBIN, (member, backend(2))), MARK):
        if "-j DNAT" in rule:
            assert rule_comment(rule) in (member.name, "b2")
        else:
            assert rule_comment(rule) is None


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("-j  ACCEPT ", ["-j", "ACCEPT"]),
        ('--comment "a \\"b\\" \\\\ \\\'c"', ["--comment", 'a "b" \\ \'c']),  # as save_string escapes
        ("--log-prefix it's", ["--log-prefix", "it's"]),  # single quotes are plain characters
        ('--comment "" -j X', ["--comment", "", "-j", "X"]),
        ('a"b c"d', ["ab cd"]),  # a quote opens and closes anywhere in a word
    ],
)
def test_rules_split_into_words_as_iptables_restore_splits_them(spec: str, words: list[str]):
    assert split_words(spec) == words


def test_an_unclosed_quote_is_an_error():
    with pytest.raises(ValueError, match="unclosed quote"):
        split_words('--comment "abc')


HOOK = "-j TCPR-FORWARD"
OPERATOR_DROP = "-s 192.0.2.0/24 -j DROP"


@pytest.mark.parametrize(
    ("docker_user", "in_place"),
    [
        ((HOOK, "-j RETURN"), True),
        ((OPERATOR_DROP, HOOK, "-j RETURN"), True),  # the operator inserted (-I) above us: theirs win, as meant
        ((OPERATOR_DROP, HOOK), True),  # DOCKER-USER without Docker's RETURN (Docker 28 and later)
        ((HOOK, "-j RETURN", OPERATOR_DROP), True),  # appended after the RETURN: it never runs, wherever we are
        ((HOOK, OPERATOR_DROP, "-j RETURN"), False),  # an operator's rule below ours would not see routed flows
        ((HOOK, OPERATOR_DROP), False),  # appended (-A) where there is no RETURN: same
        (("-j RETURN", HOOK), False),  # after the RETURN: never reached
        ((HOOK, HOOK, "-j RETURN"), False),
        (("-j RETURN",), False),
    ],
)
def test_the_hook_in_docker_user_belongs_after_the_operators_rules_and_before_the_return(docker_user, in_place):
    assert hook_in_place("DOCKER-USER", docker_user, HOOK) is in_place
    if in_place:
        assert "DOCKER-USER" not in restore_script(
            {"filter": {"DOCKER-USER": docker_user}}, compile_rules(DesiredState({}))
        ), "a resync moves nothing"
    else:
        tables = {"filter": {"DOCKER-USER": docker_user}}
        apply_script_to_model(tables, restore_script(tables, compile_rules(DesiredState({}))))
        placed = tables["filter"]["DOCKER-USER"]
        assert hook_in_place("DOCKER-USER", placed, HOOK)
        assert [r for r in placed if r != HOOK] == [r for r in docker_user if r != HOOK]  # foreign rules unmoved


def test_hooks_elsewhere_stay_first():
    assert hook_in_place("FORWARD", (HOOK, OPERATOR_DROP), HOOK)
    assert not hook_in_place("FORWARD", (OPERATOR_DROP, HOOK), HOOK)


_DISPATCH = re.compile(r"-p (tcp|udp) -m \1 --dport (\d+)(?::(\d+))? -j (\S+)")


def dispatched(nat: dict[str, tuple[str, ...]], protocol: Protocol, port: int) -> tuple[str | None, int]:
    """The chain a new connection to (`protocol`, `port`) leaves the dispatch for, and the rules it crossed."""
    crossed, chain = 0, "TCPR-FRONTENDS"
    while True:
        for rule in nat[chain]:
            crossed += 1
            match = _DISPATCH.fullmatch(rule)
            assert match, rule
            low, high = int(match[2]), int(match[3] or match[2])
            if match[1] == protocol and low <= port <= high:
                chain = match[4]
                break
        else:
            return None, crossed
        if frontend_of(chain):
            return chain, crossed
        assert dispatch_range_size(chain), chain


def routed_state(tcp: set[int], udp: set[int] = frozenset()) -> DesiredState:
    def pools(ports: set[int], protocol: Protocol) -> dict[int, Frontend]:
        return {p: Frontend(p, Balance.ROUNDROBIN, (backend(1),), protocol=protocol) for p in ports}

    return DesiredState(frontends=pools(tcp, Protocol.TCP), udp_frontends=pools(udp, Protocol.UDP))


@given(
    st.sets(st.integers(1, 65535), max_size=300),
    st.sets(st.integers(1, 65535), max_size=80),
    st.lists(st.integers(1, 65535), max_size=20),
)
def test_every_frontend_is_reached_through_the_dispatch_and_no_other_port(tcp, udp, others):
    """Flat or a tree, a first packet reaches its own frontend's chain, crossing at most TCPR-FRONTENDS and one
    tree's rules (16 per range of 4096, 256 per bucket); a port without a frontend leaves the dispatch unrouted.
    The tree's chains are those of the non-empty ranges, for a tree only."""
    nat = compile_rules(routed_state(tcp, udp)).chains["nat"]
    tree_chains: set[str] = set()
    for protocol, routed in ((Protocol.TCP, tcp), (Protocol.UDP, udp)):
        tree = len(routed) > FLAT_DISPATCH_MAX
        for port in routed:
            chain, crossed = dispatched(nat, protocol, port)
            assert chain == frontend_chain(port, protocol)
            assert crossed <= len(nat["TCPR-FRONTENDS"]) + (16 + BUCKET_SIZE if tree else 0)
        for port in set(others) - routed:
            assert dispatched(nat, protocol, port)[0] is None
        if tree:
            tree_chains |= {dispatch_chain(p - p % s, s, protocol) for p in routed for s in DISPATCH_LEVELS}
    assert {chain for chain in nat if dispatch_range_size(chain)} == tree_chains


def test_up_to_64_frontends_keep_the_flat_dispatch():
    nat = compile_rules(routed_state(set(range(1000, 1064)), {53})).chains["nat"]
    assert nat["TCPR-FRONTENDS"] == (
        *(f"-p tcp -m tcp --dport {p} -j TCPR-FE-{p}" for p in range(1000, 1064)),
        "-p udp -m udp --dport 53 -j TCPR-UDP-53",
    )
    assert not any(is_bucket_chain(chain) for chain in nat)


def test_beyond_64_frontends_the_dispatch_is_a_tree_of_port_ranges():
    tcp = {80, 443, *range(27000, 27300), 65535}
    nat = compile_rules(routed_state(tcp, {53})).chains["nat"]
    assert nat["TCPR-FRONTENDS"] == (
        "-p tcp -m tcp --dport 0:4095 -j TCPR-DT0x4096",
        "-p tcp -m tcp --dport 24576:28671 -j TCPR-DT24576x4096",
        "-p tcp -m tcp --dport 61440:65535 -j TCPR-DT61440x4096",
        "-p udp -m udp --dport 53 -j TCPR-UDP-53",
    )
    assert nat["TCPR-DT0x4096"] == (
        "-p tcp -m tcp --dport 0:255 -j TCPR-DT0x256",
        "-p tcp -m tcp --dport 256:511 -j TCPR-DT256x256",
    )
    assert nat["TCPR-DT24576x4096"] == (
        "-p tcp -m tcp --dport 26880:27135 -j TCPR-DT26880x256",
        "-p tcp -m tcp --dport 27136:27391 -j TCPR-DT27136x256",
    )
    assert nat["TCPR-DT61440x4096"] == ("-p tcp -m tcp --dport 65280:65535 -j TCPR-DT65280x256",)
    assert nat["TCPR-DT0x256"] == ("-p tcp -m tcp --dport 80 -j TCPR-FE-80",)
    assert nat["TCPR-DT27136x256"] == tuple(f"-p tcp -m tcp --dport {p} -j TCPR-FE-{p}" for p in range(27136, 27300))
    assert len(nat["TCPR-DT26880x256"]) == 136
    assert [chain for chain in nat if chain.startswith("TCPR-DU")] == []  # UDP's one frontend: flat


@given(st.integers(0, 65535), st.sampled_from(Protocol), st.sampled_from(DISPATCH_LEVELS))
def test_the_trees_chains_are_not_per_frontend_chains(port, protocol, size):
    """A tree chain's name fits iptables (28 characters) and has no -<digits> tail, which the syncer reads as
    a frontend's own chain; only the last level's chains are buckets."""
    chain = dispatch_chain(port - port % size, size, protocol)
    assert dispatch_range_size(chain) == size and len(chain) <= 28
    assert is_bucket_chain(chain) == (size == BUCKET_SIZE) and is_bucket_chain(bucket_chain(port, protocol))
    assert frontend_of(chain) is None and not re.search(r"-\d+$", chain)
    for other in (frontend_chain(port, protocol), "TCPR-FRONTENDS", f"TCPR-DT{port}", f"TCPR-DT0{port}x256"):
        assert dispatch_range_size(other) is None
