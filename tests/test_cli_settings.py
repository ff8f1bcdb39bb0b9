"""Flags and their TCPROUTER_* variables: the same values, the same checks, the same errors; combinations of
settings that cannot work are errors at start. Every option of every command is covered by introspecting
the real parsers, so a new flag without a sample here fails."""

from __future__ import annotations

import argparse

import pytest

from tcprouter import cli
from tcprouter.commands.common import policy

GATEWAY = ["--engines", "--docker-url", "tcp://198.18.0.1:2376"]
# dest -> (a valid value, an invalid value or None if every string is valid, flags the value needs with it)
SAMPLES: dict[str, tuple[str, str | None, list[str]]] = {
    "label_prefix": ("io.example.tcp", "has space", []),
    "udp_label_prefix": ("io.example.udp", "has space", []),
    "docker_url": ("tcp://198.18.0.1:2376", None, []),
    "listen_address": ("198.51.100.1", "300.1.1.1", []),
    "mark_bit": ("0x4000", "3", []),
    "metrics_address": ("127.0.0.1:9999", "localhost", []),
    "resync_interval": ("30", "0", []),
    "check_interval": ("0.5", "-1", []),
    "metrics_read_interval": ("0", "-1", []),
    "swarm_poll_interval": ("2", "soon", ["--swarm"]),
    "probe_interval": ("3", "0", GATEWAY),
    "probe_timeout": ("0.25", "x", GATEWAY),
    "probe_fall": ("3", "1.5", GATEWAY),
    "probe_rise": ("2", "0", GATEWAY),
    "ports": ("1883,8000-8100,27017", "8100-8000", []),
    "owner_label": ("com.docker.compose.project", "has space", []),
}


def _options() -> list[tuple[str, str, list[argparse.Action]]]:
    """(command, variable, the actions that share its dest) for every option of every command."""
    _, commands = cli.parsers()
    return [
        (name, dest, actions)
        for name, command in commands.items()
        for dest, actions in cli.options_by_dest(command).items()
    ]


OPTIONS = _options()
IDS = [f"{command}-{dest}" for command, dest, _ in OPTIONS]
# The options that have an invalid value (every string is a valid --docker-url).
REFUSABLE = [option for option in OPTIONS if option[1] not in SAMPLES or SAMPLES[option[1]][1] is not None]


def _valid(dest: str, actions: list[argparse.Action]) -> tuple[str, list[str], list[str]]:
    """A valid value of the variable, the same as flags, and the flags it needs with it."""
    action = actions[0]
    if action.nargs == 0 and action.const is True:
        return "1", [action.option_strings[-1]], []
    if action.nargs == 0:  # a choice between switches (--swarm | --engines): the variable names the switch
        return "swarm", ["--swarm"], []
    if action.choices:
        value = str(list(action.choices)[-1])
        return value, [f"{action.option_strings[-1]}={value}"], []
    value, _, context = SAMPLES[dest]
    return value, [f"{action.option_strings[-1]}={value}"], context


def _invalid(dest: str, actions: list[argparse.Action]) -> tuple[str, list[str]] | None:
    """An invalid value of the variable and the flag with that value (None for a switch, whose flag takes none)."""
    action = actions[0]
    if action.nargs == 0:
        return "maybe", []
    value = "bogus" if action.choices else SAMPLES[dest][1]
    return None if value is None else (value, [f"{action.option_strings[-1]}={value}"])


def _error(argv: list[str], environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.parse_args(argv, environ)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line, never a traceback
    return err


def test_every_option_of_every_command_has_a_variable_and_a_sample():
    assert {dest for _, dest, actions in OPTIONS if actions[0].nargs != 0 and not actions[0].choices} == set(SAMPLES)
    assert {cli.env_name(dest) for _, dest, _ in OPTIONS} >= {"TCPROUTER_PROVIDER", "TCPROUTER_METRICS_ADDRESS"}


@pytest.mark.parametrize(("command", "dest", "actions"), OPTIONS, ids=IDS)
def test_a_variable_gives_the_same_settings_as_its_flag(command: str, dest: str, actions: list[argparse.Action]):
    value, flags, context = _valid(dest, actions)
    by_flag = cli.parse_args([command, *context, *flags], {})
    by_variable = cli.parse_args([command, *context], {cli.env_name(dest): value})
    assert by_variable == by_flag
    assert getattr(by_flag, dest) != getattr(cli.parse_args([command, *context], {}), dest)  # the value counts


@pytest.mark.parametrize(("command", "dest", "actions"), REFUSABLE, ids=[f"{c}-{d}" for c, d, _ in REFUSABLE])
def test_an_invalid_variable_is_refused_as_its_flag_is(
    command: str, dest: str, actions: list[argparse.Action], capsys: pytest.CaptureFixture[str]
):
    invalid = _invalid(dest, actions)
    assert invalid is not None
    value, flags = invalid
    context = SAMPLES.get(dest, ("", None, []))[2]
    by_variable = _error([command, *context], {cli.env_name(dest): value}, capsys)
    assert by_variable.startswith(f"tcprouter {command}: error: {cli.env_name(dest)}={value!r}: ")
    if flags:  # the flag's own message, word for word
        by_flag = _error([command, *context, *flags], {}, capsys)
        assert by_flag.removeprefix(f"tcprouter {command}: error: ") in by_variable


def test_the_command_line_wins_over_the_variable():
    environ = {"TCPROUTER_SNAT": "always", "TCPROUTER_PROVIDER": "swarm", "TCPROUTER_DOCKER_URL": "tcp://a:1"}
    args = cli.parse_args(["run", "--snat", "hairpin", "--engines", "--docker-url", "tcp://b:1"], environ)
    assert (args.snat, args.provider, args.docker_url) == ("hairpin", "engines", ["tcp://b:1"])


@pytest.mark.parametrize("value", ["", "0", "false", "No", "off"])
def test_a_switch_variable_can_say_off(value: str):
    assert cli.parse_args(["render"], {"TCPROUTER_ROUTE_LOCALHOST": value}).route_localhost is False


def test_an_empty_metrics_address_means_no_endpoint_and_the_default_is_every_address_port_9105():
    assert cli.parse_args(["run"], {}).metrics_address == ":9105"
    assert cli.parse_args(["run", "--metrics-address", ""], {}).metrics_address == ""
    assert cli.parse_args(["run"], {"TCPROUTER_METRICS_ADDRESS": ""}).metrics_address == ""


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["run", "--route-localhost", "--listen-address", "198.51.100.1"], "--route-localhost routes 127.0.0.1"),
        (["render", "--route-localhost", "--listen-address", "198.51.100.1"], "--route-localhost routes 127.0.0.1"),
        (["run", "--probe-interval", "5"], "--probe-interval applies only in gateway mode"),
        (["run", "--probe-fall", "5"], "--probe-fall applies only in gateway mode"),
        (["run", "--swarm-poll-interval", "2"], "--swarm-poll-interval applies only with --swarm"),
        (["run", *GATEWAY, "--swarm-poll-interval", "2"], "--swarm-poll-interval applies only with --swarm"),
        (["run", *GATEWAY, "--probe-timeout", "1"], "--probe-timeout (1s) must be shorter than --probe-interval (1s)"),
        (["run", "--swarm", "--docker-url", "tcp://a:1", "--docker-url", "tcp://b:1"], "--swarm follows one manager"),
        (["cleanup", "--engines"], "--engines needs --docker-url"),
        (["run", "--swarm", "--engines"], "argument --engines: not allowed with argument --swarm"),
        (["run", "--resync-interval", "0"], "argument --resync-interval: must be more than 0: '0'"),
        (["run", "--check-interval", "-1"], "argument --check-interval: must be more than 0: '-1'"),
        (["run", "--listen-address", "::1::"], "argument --listen-address: not an IPv4 or IPv6 address"),
        (["run", "--ipv6", "off", "--listen-address", "fd00::1"], "--listen-address is an IPv6 address, which"),
        (["run", "--metrics-address", "[nope]:9105"], "not an IPv6 address in brackets"),
        (["run", "--metrics-address", ":99999"], "expected host:port"),
        (["status", "--mark-bit", "0x100000000"], "must be one bit of the 32-bit conntrack mark"),
        (["status", "--label-prefix", ""], "argument --label-prefix: expected letters"),
        (["status", "--label-prefix", "udp"], "--udp-label-prefix and --label-prefix are both 'udp'"),
    ],
)
def test_settings_that_cannot_work_are_an_error_at_start(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
):
    assert words in _error(argv, {}, capsys)


def test_an_env_setting_in_conflict_is_refused_too(capsys: pytest.CaptureFixture[str]):
    err = _error(["run", "--route-localhost"], {"TCPROUTER_LISTEN_ADDRESS": "198.51.100.1"}, capsys)
    assert "--route-localhost routes 127.0.0.1" in err


def test_gateway_settings_are_accepted_in_gateway_mode():
    args = cli.parse_args(["run", "--swarm", "--swarm-poll-interval", "2", "--probe-timeout", "0.9"], {})
    assert (args.swarm_poll_interval, args.probe_timeout, args.docker_url) == (2.0, 0.9, [])


def test_the_owner_label_defaults_by_mode_and_an_empty_one_turns_ownership_off():
    def owner_label(argv: list[str], environ: dict[str, str] | None = None) -> str:
        return policy(cli.parse_args(["run", *argv], environ or {})).owner_label

    assert owner_label([]) == "com.docker.compose.project"
    assert owner_label(GATEWAY) == "com.docker.compose.project"
    assert owner_label(["--swarm"]) == "com.docker.stack.namespace"
    assert owner_label(["--swarm", "--owner-label", "team"]) == "team"
    assert owner_label([], {"TCPROUTER_OWNER_LABEL": ""}) == ""
    assert policy(cli.parse_args(["run"], {})).allowed_ports is None
    assert 8050 in policy(cli.parse_args(["run", "--ports", "8000-8100"], {})).allowed_ports
