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


def test_overrides_after_options_are_kept(monkeypatch):
    seen = {}

    def fake_run(args):
        seen.update(vars(args))
        return 0

    import dist_seg.trainer as trainer

    monkeypatch.setattr(trainer, "run", fake_run)
    assert cli.main(["train", "recipes/stego_toy.py", "--config", "a.yaml", "train.num_steps=3", "data.root=/x"]) == 0
    assert seen["config"] == ["a.yaml"] and seen["overrides"] == ["train.num_steps=3", "data.root=/x"]
    with pytest.raises(SystemExit):
        cli.main(["train", "recipes/stego_toy.py", "--no-such-flag"])
