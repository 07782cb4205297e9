"""The command line per side: `python -m edgert` (a board) offers serve, probe and keys and says
where a host command runs; the `edgert` console script (control.cli) offers every command."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from control import cli as host_cli
from edgert import cli as board_cli

ROOT = Path(__file__).resolve().parents[2]


def test_every_command_is_on_exactly_one_side():
    host = set(host_cli.COMMANDS) - set(board_cli.BOARD_COMMANDS)
    assert set(board_cli.BOARD_COMMANDS) == {"serve", "probe", "keys"}
    assert set(board_cli.BOARD_COMMANDS) <= set(host_cli.COMMANDS)   # the console script: all
    assert host == set(board_cli.HOST_COMMANDS)     # the board names each host command


def test_console_script_is_the_host_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["edgert"] == "control.cli:main"


@pytest.mark.parametrize("command", board_cli.HOST_COMMANDS)
def test_board_cli_names_a_host_command_and_how_to_run_it(command, capsys):
    assert board_cli.main([command, "--help"]) == 2
    err = capsys.readouterr().err
    assert f"'{command}' is a host command" in err and f"python -m control {command}" in err


def test_board_cli_loads_neither_control_nor_the_compiler():
    code = ("import sys; from edgert import cli; cli.build_parser().parse_args(['probe']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('control', 'compiler', "
            "'tvm', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_host_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        host_cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "{" + ",".join(host_cli.COMMANDS) + "}" in out
