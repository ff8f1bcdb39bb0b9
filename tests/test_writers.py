"""The two writers: iptables-restore (netfilter.Iptables) and libiptc (iptc_writer.IptcWriter).

The restore script of diff.restore_script is the single source of truth for a write; both writers
must leave the kernel in the same state for it, respect the same ownership rules, and the libiptc
writer must survive writers that change the table between its read and its commit.
Kernel tests run in private network namespaces; the libiptc writer acts in the namespace of the
calling thread, so its calls run in a thread that joined the namespace (support.in_netns).
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tcprouter.compiler import Options, RuleSet, Synproxy, compile_rules, frontend_chain, rule_comment
from tcprouter.diff import believed_tables, hook_in_place, owned_only, parse_save, restore_script
from tcprouter.iptc_writer import IptcWriter, Operation, ScriptError, parse_script
from tcprouter.model import Backend, Balance, DesiredState, Frontend, Protocol
from tcprouter.netfilter import Flavour, Iptables, NetfilterError, open_writer

from .strategies import desired_states
from .support import REPO, in_netns, private_netns, sh

# Foreign objects as Docker and an admin leave them: a chain of their own, rules in the parents we
# hook into (one looks much like our hook), DOCKER-USER ending in RETURN.
FOREIGN = """*nat
:FOREIGN - [0:0]
:DOCKER - [0:0]
-A PREROUTING -p udp -m udp --dport 53 -j FOREIGN
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A FOREIGN -j RETURN
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
:DOCKER-USER - [0:0]
:FOREIGN - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A DOCKER-USER -j RETURN
-A FOREIGN -s 10.0.0.0/8 -j DROP
COMMIT
"""
OPTIONS = Options(forward_parent="DOCKER-USER")


def saved(ns: str) -> str:
    """`iptables-legacy-save` of the namespace, without comment lines and counters."""
    lines = []
    for line in sh("ip", "netns", "exec", ns, "iptables-legacy-save").splitlines():
        if line.startswith("#"):
            continue
        if line.startswith(":"):
            line = line.rsplit(" ", 1)[0]
        lines.append(line)
    return "\n".join(lines) + "\n"


def foreign_lines(ns: str) -> list[str]:
    return [line for line in saved(ns).splitlines() if "TCPR-" not in line]


def without_raw(lines: list[str]) -> list[str]:
    """Saved lines but those of the raw table (iptables-save prints it first): a legacy table, once written,
    stays, so the raw table synproxy used stays too, empty."""
    return lines[lines.index("COMMIT") + 1 :] if lines and lines[0] == "*raw" else lines


class Restore:
    """The restore writer on a namespace."""

    def __init__(self, ns: str) -> None:
        self.writer = Iptables(Flavour.LEGACY, netns=ns)

    def read(self):
        return self.writer.read()

    def restore(self, script: str) -> None:
        self.writer.restore(script)


class Iptc:
    """The libiptc writer, every call from a thread inside the namespace."""

    def __init__(self, ns: str, writer: IptcWriter | None = None) -> None:
        self.ns = ns
        self.writer = writer or IptcWriter()

    def read(self):
        return in_netns(self.ns, self.writer.read)

    def restore(self, script: str) -> None:
        in_netns(self.ns, lambda: self.writer.restore(script))


def sync(writer, rules: RuleSet) -> str:
    """A full sync as the reconciler does it: read the kernel, diff, write."""
    current, _ = writer.read()
    script = restore_script(current, rules)
    writer.restore(script)
    return script


def kernel_owned(ns: str):
    return owned_only(parse_save(saved(ns))[0])


# ---- the script parser (no kernel) ---------------------------------------------------------------


def test_parse_script_reads_every_kind_of_line_in_order():
    script = (
        "*nat\n:TCPR-FE-80 - [0:0]\n-D PREROUTING -j TCPR-FRONTENDS\n-I PREROUTING 1 -m addrtype --dst-type LOCAL "
        "-j TCPR-FRONTENDS\n-A TCPR-FE-80 -j CONNMARK --set-xmark 0x1/0x1\n-X TCPR-FE-81\nCOMMIT\n*filter\nCOMMIT\n"
    )
    assert parse_script(script) == [
        (
            "nat",
            [
                Operation("declare", "TCPR-FE-80"),
                Operation("delete", "PREROUTING", "-j TCPR-FRONTENDS"),
                Operation("insert", "PREROUTING", "-m addrtype --dst-type LOCAL -j TCPR-FRONTENDS"),
                Operation("append", "TCPR-FE-80", "-j CONNMARK --set-xmark 0x1/0x1"),
                Operation("remove", "TCPR-FE-81"),
            ],
        ),
        ("filter", []),
    ]
    assert parse_script("") == []


@pytest.mark.parametrize(
    "line",
    [
        ":FORWARD - [0:0]",  # would flush a chain we do not own
        ":DOCKER-USER - [0:0]",
        "-A FORWARD -j ACCEPT",  # we only append to our own chains
        "-X DOCKER",
        "-F FORWARD",
        "-P FORWARD ACCEPT",
        "-R FORWARD 1 -j ACCEPT",
        "-I FORWARD 0 -j TCPR-FORWARD",  # positions count from 1
        "-I FORWARD -j TCPR-FORWARD",
        "-N TCPR-X",
    ],
)
def test_parse_script_refuses_what_is_not_ours_or_not_understood(line):
    with pytest.raises(ScriptError):
        parse_script(f"*filter\n:TCPR-OK - [0:0]\n{line}\nCOMMIT\n")


def test_parse_script_refuses_unterminated_tables():
    with pytest.raises(ScriptError):
        parse_script("*filter\n:TCPR-OK - [0:0]\n")
    with pytest.raises(ScriptError):
        parse_script(":TCPR-OK - [0:0]\nCOMMIT\n")


# ---- the --writer option -------------------------------------------------------------------------


def test_writer_auto_and_restore_pick_iptables_restore_of_the_flavour():
    for writer in ("auto", "restore"):
        for flavour in Flavour:
            chosen = open_writer(writer, flavour)
            assert isinstance(chosen, Iptables) and chosen.flavour is flavour


def test_writer_iptc_on_a_legacy_host_is_the_libiptc_writer():
    chosen = open_writer("iptc", Flavour.LEGACY)
    assert isinstance(chosen, IptcWriter) and chosen.flavour is Flavour.LEGACY


def test_writer_iptc_on_an_nft_host_is_a_startup_error():
    with pytest.raises(NetfilterError, match="only the legacy tables"):
        open_writer("iptc", Flavour.NFT)
    with pytest.raises(NetfilterError, match="unknown writer"):
        open_writer("fast", Flavour.LEGACY)
    done = subprocess.run(
        [sys.executable, "-m", "tcprouter", "cleanup", "--writer", "iptc", "--flavour", "nft"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 1
    assert "--writer iptc cannot be used here" in done.stderr


# ---- kernel: equivalence of the writers ----------------------------------------------------------

mark_bits = st.sampled_from([0x100000, 0x1, 0x80000000, 0x4000])
listen_addresses = st.sampled_from([None, "198.51.100.1", "203.0.113.7"])
options = st.builds(
    Options,
    mark_bit=mark_bits,
    listen_address=listen_addresses,
    snat_always=st.booleans(),
    route_localhost=st.booleans(),
    route_localnet_before=st.sampled_from([0, 1]),
    synproxy=st.sampled_from(Synproxy),
    tcp_loose_before=st.sampled_from([0, 1]),
    forward_parent=st.just("DOCKER-USER"),
)


@pytest.mark.kernel
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    first=desired_states(max_frontends=4, max_backends=4),
    second=desired_states(max_frontends=4, max_backends=4),
    first_options=options,
    second_options=options,
)
@example(  # found by CI: the raw table created by the write (synproxy) must be read back from the writer's namespace
    first=DesiredState(frontends={}),
    second=DesiredState(
        frontends={
            1: Frontend(
                1,
                Balance.ROUNDROBIN,
                (Backend("1".zfill(64), "a-1", "172.16.0.3", 1, subnet="172.16.0.0/16"),),
                synproxy=True,
            )
        }
    ),
    first_options=Options(mark_bit=0x100000, synproxy=Synproxy.LABEL, forward_parent="DOCKER-USER"),
    second_options=Options(mark_bit=0x100000, synproxy=Synproxy.LABEL, forward_parent="DOCKER-USER"),
)
def test_restore_and_iptc_writers_leave_identical_tables(first, second, first_options, second_options):
    with private_netns() as ns_restore, private_netns() as ns_iptc:
        restore, iptc = Restore(ns_restore), Iptc(ns_iptc)
        restore.restore(FOREIGN)
        Restore(ns_iptc).restore(FOREIGN)
        foreign = foreign_lines(ns_restore)

        for state, opts in ((first, first_options), (second, second_options)):  # a fresh write, then an update
            rules = compile_rules(state, opts)
            script = sync(restore, rules)
            assert sync(iptc, rules) == script  # same kernel state before, so the same script
            assert saved(ns_iptc) == saved(ns_restore)
            assert kernel_owned(ns_iptc) == owned_only(believed_tables(rules))
            assert without_raw(foreign_lines(ns_iptc)) == foreign

        assert sync(iptc, rules) == ""  # in step: nothing left to write
        cleanup = RuleSet(chains={})
        sync(restore, cleanup)
        sync(iptc, cleanup)
        assert saved(ns_iptc) == saved(ns_restore)
        assert "TCPR-" not in saved(ns_iptc)
        assert without_raw(foreign_lines(ns_iptc)) == without_raw(foreign_lines(ns_restore)) == foreign


@pytest.mark.kernel
def test_both_writers_write_a_dispatch_tree_and_take_it_back_to_flat_rules():
    """100 TCP and UDP frontends (trees of port ranges), a frontend joining one bucket, 60 (flat again), cleanup:
    both writers leave the same tables, and the kernel holds what was compiled."""
    pool = (Backend("1" * 64, "web.1", "172.17.0.2", 80),)

    def state(ports: range | list[int]) -> DesiredState:
        tcp, udp = (
            {p: Frontend(p, Balance.ROUNDROBIN, pool, protocol=protocol) for p in ports}
            for protocol in (Protocol.TCP, Protocol.UDP)
        )
        return DesiredState(tcp, udp_frontends=udp)

    with private_netns() as ns_restore, private_netns() as ns_iptc:
        restore, iptc = Restore(ns_restore), Iptc(ns_iptc)
        for ns in (ns_restore, ns_iptc):
            Restore(ns).restore(FOREIGN)
        steps = (range(65400, 65500), [*range(65400, 65500), 65535], range(65400, 65460))
        for rules in (*(compile_rules(state(ports), OPTIONS) for ports in steps), RuleSet(chains={})):
            assert sync(iptc, rules) == sync(restore, rules)
            assert saved(ns_iptc) == saved(ns_restore)
            assert kernel_owned(ns_iptc) == owned_only(believed_tables(rules))
        assert "TCPR-" not in saved(ns_iptc)


# Rules the compiler does not write, in the form iptables-save prints: the parser is generic.
GENERIC_RULES = (
    "-s 10.1.0.0/16 -d 10.2.3.4/32 -i eth0 -o br+ -p tcp -m tcp --dport 80 -j ACCEPT",
    "! -s 10.1.0.0/16 ! -d 10.2.3.4/32 ! -i eth0 ! -o br+ ! -p udp -j DROP",
    "-p tcp -m multiport --dports 80,443,8000:8080 -m conntrack ! --ctstate INVALID,NEW -j RETURN",
    '-m comment --comment "two words, \\"quoted\\"" -j TCPR-TARGET',
    "-p tcp -m tcp --sport 1024:65535 --tcp-flags FIN,SYN,RST,ACK SYN -g TCPR-TARGET",
    "-m recent --set --name tcpr --mask 255.255.255.255 --rsource",
    "-m statistic --mode random --probability 0.33333333349 -m mark --mark 0x10/0xff -j MARK --set-xmark 0x1/0xff",
    "-p tcp -j REJECT --reject-with tcp-reset",
    "-m connmark ! --mark 0x100000/0x100000 -j TCPR-TARGET",
    '-m addrtype --src-type LOCAL --dst-type UNICAST -j LOG --log-prefix "tcpr: " --log-level 6',
)


@pytest.mark.kernel
def test_generic_rules_round_trip_through_both_writers():
    script = "*filter\n:TCPR-TARGET - [0:0]\n:TCPR-GENERIC - [0:0]\n"
    script += "".join(f"-A TCPR-GENERIC {rule}\n" for rule in GENERIC_RULES) + "COMMIT\n"
    with private_netns() as ns_restore, private_netns() as ns_iptc:
        Restore(ns_restore).restore(script)
        Iptc(ns_iptc).restore(script)
        assert saved(ns_iptc) == saved(ns_restore)
        written = parse_save(saved(ns_iptc))[0]["filter"]["TCPR-GENERIC"]
        assert written == GENERIC_RULES
        # and a rule is deleted by its exact text, as the hooks are
        Iptc(ns_iptc).restore(f"*filter\n-D TCPR-GENERIC {GENERIC_RULES[3]}\nCOMMIT\n")
        assert parse_save(saved(ns_iptc))[0]["filter"]["TCPR-GENERIC"] == GENERIC_RULES[:3] + GENERIC_RULES[4:]


@pytest.mark.kernel
@settings(max_examples=20, deadline=None)
@given(name=st.from_regex(r"[A-Za-z0-9][ -~]{0,63}", fullmatch=True))
@example(name='it\'s "web" \\ 1')
def test_backend_names_survive_iptables_save(name: str):
    """A DNAT rule's comment, as compiler.save_string writes it, is what iptables-save prints for it (either
    writer), and compiler.rule_comment reads the backend's name back out of that text. Names start as
    Docker's do (a letter or digit), then hold any printable character: spaces, quotes, backslashes."""
    member = Backend("1" * 64, name, "172.17.0.2", 1234)
    state = DesiredState(frontends={80: Frontend(80, Balance.ROUNDROBIN, (member,))})
    rules = compile_rules(state, Options(forward_parent="FORWARD"))
    with private_netns() as ns_restore, private_netns() as ns_iptc:
        for writer, ns in ((Restore(ns_restore), ns_restore), (Iptc(ns_iptc), ns_iptc)):
            sync(writer, rules)
            chain = parse_save(saved(ns))[0]["nat"][frontend_chain(80)]
            assert chain == rules.chains["nat"][frontend_chain(80)]
            assert [rule_comment(rule) for rule in chain if "-j DNAT" in rule] == [name]


# ---- kernel: ownership -----------------------------------------------------------------------------


@pytest.mark.kernel
def test_iptc_writer_leaves_foreign_objects_alone_through_apply_repair_and_cleanup():
    state_rules = compile_rules(_fixed_state(), OPTIONS)
    with private_netns() as ns:
        iptc = Iptc(ns)
        Restore(ns).restore(FOREIGN)
        foreign = foreign_lines(ns)

        sync(iptc, state_rules)
        assert foreign_lines(ns) == foreign
        tables = parse_save(saved(ns))[0]
        for table, hooks in state_rules.hooks.items():
            for parent, hook in hooks:
                assert hook_in_place(parent, tables[table][parent], hook)
        assert kernel_owned(ns) == owned_only(believed_tables(state_rules))

        # someone inserts above our hooks: a resync puts ours back on top, theirs stay; in DOCKER-USER the
        # operator's rule belongs above ours and nothing moves
        Restore(ns).restore("*nat\n-I PREROUTING 1 -p tcp -m tcp --dport 22 -j RETURN\nCOMMIT\n")
        Restore(ns).restore("*filter\n-I DOCKER-USER 1 -s 192.0.2.1/32 -j DROP\nCOMMIT\n")
        script = sync(iptc, state_rules)
        assert "-D PREROUTING " in script and "-I PREROUTING 1 " in script
        assert "DOCKER-USER" not in script
        tables = parse_save(saved(ns))[0]
        assert tables["nat"]["PREROUTING"][:2] == (
            state_rules.hooks["nat"][0][1],
            "-p tcp -m tcp --dport 22 -j RETURN",
        )
        assert tables["filter"]["DOCKER-USER"] == ("-s 192.0.2.1/32 -j DROP", "-j TCPR-FORWARD", "-j RETURN")
        assert kernel_owned(ns) == owned_only(believed_tables(state_rules))

        # cleanup removes every owned object and nothing else
        sync(iptc, RuleSet(chains={}))
        after = saved(ns)
        assert "TCPR-" not in after
        assert "-A PREROUTING -p tcp -m tcp --dport 22 -j RETURN" in after
        assert "-A DOCKER-USER -s 192.0.2.1/32 -j DROP" in after
        assert [line for line in after.splitlines() if "dport 22" not in line and "192.0.2.1" not in line] == foreign


def _fixed_state():
    def pool(port: int, count: int, balance: Balance) -> Frontend:
        members = tuple(
            Backend(
                f"{port:032x}{i:032x}",
                f"app-{port}-{i}",
                f"172.20.{port % 250}.{i + 2}",
                1234,
                i + 1,
                f"172.20.{port % 250}.0/24",
            )
            for i in range(count)
        )
        return Frontend(port, balance, members)

    return DesiredState(
        frontends={
            27017: pool(27017, 3, Balance.ROUNDROBIN),
            1883: pool(1883, 2, Balance.RANDOM),
            80: pool(80, 1, Balance.ROUNDROBIN),
        }
    )


@pytest.mark.kernel
def test_cli_cleanup_with_the_iptc_writer_in_a_namespace():
    """`tcprouter cleanup --writer iptc` end to end, run inside a private namespace."""
    with private_netns() as ns:
        Restore(ns).restore(FOREIGN)
        foreign = foreign_lines(ns)
        sync(Restore(ns), compile_rules(_fixed_state(), OPTIONS))
        assert "TCPR-" in saved(ns)
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "tcprouter",
                "cleanup",
                "--writer",
                "iptc",
                "--flavour",
                "legacy",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "python-iptables" in done.stderr
        assert foreign_lines(ns) == foreign == saved(ns).splitlines()


@pytest.mark.kernel
def test_a_refused_script_changes_nothing():
    with private_netns() as ns:
        iptc = Iptc(ns)
        Restore(ns).restore(FOREIGN)
        before = saved(ns)
        with pytest.raises(ScriptError):
            iptc.restore("*nat\n:TCPR-NEW - [0:0]\nCOMMIT\n*filter\n:DOCKER-USER - [0:0]\nCOMMIT\n")
        assert saved(ns) == before


@pytest.mark.kernel
def test_a_table_is_committed_whole_or_not_at_all():
    """A failing operation (here: deleting a rule that is not there) leaves the table as it was."""
    with private_netns() as ns:
        Restore(ns).restore(FOREIGN)
        before = saved(ns)
        script = "*nat\n:TCPR-A - [0:0]\n-A TCPR-A -j RETURN\n-I PREROUTING 1 -j TCPR-A\n-D OUTPUT -j TCPR-A\nCOMMIT\n"
        with pytest.raises(NetfilterError, match="OUTPUT"):
            Iptc(ns).restore(script)
        with pytest.raises(NetfilterError):
            Restore(ns).restore(script)  # the restore writer behaves alike
        assert saved(ns) == before


# ---- kernel: concurrent writers --------------------------------------------------------------------

HOOK_SCRIPT = "*filter\n:TCPR-FORWARD - [0:0]\n-A TCPR-FORWARD -j ACCEPT\n-I FORWARD 1 -j TCPR-FORWARD\nCOMMIT\n"


class RacedWriter(IptcWriter):
    """Runs `meddle(table, attempt)` between reading the table and committing it: a concurrent writer."""

    def __init__(self, meddle) -> None:
        super().__init__(attempts=3)
        self.meddle = meddle
        self.commits = 0

    def _commit(self, handle) -> None:
        self.commits += 1
        self.meddle(handle.name, self.commits)
        super()._commit(handle)


def _foreign_insert(rule: str, lock: str = "/run/tcprouter-test-other.lock") -> None:
    """iptables-legacy from a writer that ignores our xtables lock (it takes another lock file)."""
    sh("env", f"XTABLES_LOCKFILE={lock}", "iptables-legacy", "-t", "filter", "-I", "FORWARD", *rule.split())


@pytest.mark.kernel
def test_a_foreign_rule_inserted_between_read_and_commit_is_kept_and_the_commit_lands():
    def meddle(table: str, attempt: int) -> None:
        if attempt == 1:
            _foreign_insert("-s 192.0.2.7/32 -j DROP")

    with private_netns() as ns:
        writer = RacedWriter(meddle)
        Iptc(ns, writer).restore(HOOK_SCRIPT)
        assert writer.commits == 2  # the kernel refused the first commit (EAGAIN); the retry re-read
        tables = parse_save(saved(ns))[0]
        assert tables["filter"]["FORWARD"] == ("-j TCPR-FORWARD", "-s 192.0.2.7/32 -j DROP")
        assert tables["filter"]["TCPR-FORWARD"] == ("-j ACCEPT",)


@pytest.mark.kernel
def test_a_writer_that_never_stops_interfering_gets_a_netfilter_error_and_nothing_half_written():
    def meddle(table: str, attempt: int) -> None:
        _foreign_insert(f"-s 192.0.2.{attempt}/32 -j DROP")

    with private_netns() as ns:
        writer = RacedWriter(meddle)
        with pytest.raises(NetfilterError, match="failed 3 times"):
            Iptc(ns, writer).restore(HOOK_SCRIPT)
        assert writer.commits == 3
        assert parse_save(saved(ns))[0]["filter"]["FORWARD"] == tuple(f"-s 192.0.2.{i}/32 -j DROP" for i in (3, 2, 1))
        assert "TCPR-" not in saved(ns)


@pytest.mark.kernel
def test_writers_that_take_the_xtables_lock_wait_for_our_commit():
    """`iptables-legacy -w` (as Docker runs it) started between our read and our commit blocks on the
    xtables lock we hold, then lands on top of our commit: neither write is lost."""
    started: list[subprocess.Popen] = []

    def meddle(table: str, attempt: int) -> None:
        if attempt == 1:
            started.append(
                subprocess.Popen(
                    ["iptables-legacy", "-w", "-t", "filter", "-I", "FORWARD", "-s", "192.0.2.9", "-j", "DROP"],
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            time.sleep(0.3)
            assert started[0].poll() is None, "iptables-legacy -w did not wait for the xtables lock"

    with private_netns() as ns:
        writer = RacedWriter(meddle)
        Iptc(ns, writer).restore(HOOK_SCRIPT)
        assert started[0].wait(10) == 0, started[0].stderr.read()
        assert writer.commits == 1
        assert parse_save(saved(ns))[0]["filter"]["FORWARD"] == ("-s 192.0.2.9/32 -j DROP", "-j TCPR-FORWARD")
