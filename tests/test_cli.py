import subprocess
import sys

import pytest

from dist_seg import cli


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert command in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "dist_seg.cli", "--help"], capture_output=True, text=True, check=True)
    assert "prepare" in out.stdout and "sweep" in out.stdout


def test_missing_stage_says_so(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("dist_seg.no_such_stage", "not built"))
    assert cli.main(["ghost"]) == 2
    assert "not implemented yet" in capsys.readouterr().err
