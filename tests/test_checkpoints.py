"""Checkpoints load with torch.load(weights_only=True) only; foreign, broken and malicious files are one-line
errors (exit code 2, no traceback) through the CLI; old pickled checkpoints need --trust-checkpoint."""

from __future__ import annotations

import collections
import dataclasses
import enum
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from dist_seg import cli
from dist_seg.checkpoints import (
    CHECKSUM_KEY,
    FORMAT_KEY,
    CheckpointError,
    DamagedCheckpointError,
    UntrustedCheckpointError,
    load_checkpoint,
    save_checkpoint,
    to_plain,
)
from dist_seg.config import RunConfig, from_yaml, merge
from dist_seg.trainer import load_latest_checkpoint, load_recipe, train

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "stego_toy.py")


class RunsCode:
    """Pickles to a call of ``exec`` that creates ``marker``: what a malicious checkpoint does on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dist_seg.data.toy import generate_toy

    tmp = tmp_path_factory.mktemp("ckpt")
    generate_toy(tmp / "toy", num_train=32, num_val=8, samples_per_shard=8)
    overrides = [f"data.root={tmp / 'toy'}", f"train.output_dir={tmp / 'run'}", "data.batch_size=8",
                 "data.num_workers=0", "stego.feature_samples=5", "train.num_steps=2", "train.val_every=0",
                 "tracking.enabled=false"]
    train(merge(load_recipe(RECIPE)(), overrides=overrides))
    images = tmp / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    return tmp, tmp / "run" / "checkpoints" / "step-00000002.pt"


def _one_line_error(captured, path: Path) -> str:
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out, f"a traceback was printed:\n{captured.err}"
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected one 'error:' line, got:\n{err}"
    assert str(path) in lines[0], f"the error must name the file: {lines[0]}"
    return lines[0]


def test_training_checkpoint_round_trips_through_weights_only(trained, capsys):
    tmp, ckpt = trained
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state[FORMAT_KEY] == 1 and state["step"] == 2
    assert isinstance(state["config"], dict) and state["config"]["method"] == "stego"
    assert all(isinstance(v, torch.Tensor) for v in state["method"].values())
    assert state["optimizer"]["param_groups"], "the optimiser state is saved (tensors and plain values)"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--out", str(tmp / "ev")]) == 0
    assert "stego (step 2)" in capsys.readouterr().out


BAD_FILES = {
    "pickle_that_runs_code": lambda p, m: torch.save({"step": 1, "method": RunsCode(m)}, p),
    "raw_pickle_that_runs_code": lambda p, m: p.write_bytes(pickle.dumps(RunsCode(m))),
    "random_bytes": lambda p, m: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "text_file": lambda p, m: p.write_text("hello\n"),
    "empty_file": lambda p, m: p.write_bytes(b""),
    "foreign_torch_file": lambda p, m: torch.save({"weight": torch.zeros(3)}, p),
    "folder": lambda p, m: p.mkdir(),
}
EXPECTED_WORDS = {"pickle_that_runs_code": "--trust-checkpoint", "raw_pickle_that_runs_code": "expected",
                  "random_bytes": "expected", "text_file": "not a torch file", "empty_file": "empty",
                  "foreign_torch_file": "not a dist_seg checkpoint", "folder": "folder"}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_checkpoint_is_a_one_line_error(kind, tmp_path, capsys):
    bad, marker = tmp_path / "bad.pt", tmp_path / "MARKER"
    BAD_FILES[kind](bad, marker)
    assert cli.main(["eval", "--checkpoint", str(bad)]) == 2
    line = _one_line_error(capsys.readouterr(), bad)
    assert EXPECTED_WORDS[kind] in line, line
    assert cli.main(["predict", "--checkpoint", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--device", "cpu"]) == 2
    _one_line_error(capsys.readouterr(), bad)
    assert not marker.exists(), "loading the checkpoint ran code from the file"


def test_the_malicious_file_really_runs_code_when_unpickled(tmp_path):
    """Control for the test above: the same payload does run under a full unpickle."""
    marker = tmp_path / "MARKER"
    torch.save({"method": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UntrustedCheckpointError, match=r"\(exec\)"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_truncated_checkpoint_through_the_console_script(trained, tmp_path):
    _, ckpt = trained
    data = ckpt.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    exe = shutil.which("dist-seg")
    cmd = [exe] if exe else [sys.executable, "-m", "dist_seg.cli"]
    res = subprocess.run([*cmd, "eval", "--checkpoint", str(bad)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert f"error: {bad} cannot be read: a truncated or corrupted torch zip archive" in res.stderr, res.stderr


def _old_style(state: dict, path: Path) -> Path:
    """A checkpoint as an older dist_seg could write it: numpy scalars and arrays, the config as a dataclass."""
    old = dict(state)
    old.pop(FORMAT_KEY)
    old["best_miou"] = np.float64(12.5)
    old["assignment"] = np.array([3, 1, 4, 0, 2])
    old["config"] = from_yaml(RunConfig, yaml.safe_dump(state["config"]))
    old["meta"] = {**state["meta"], "num_classes": np.int64(state["meta"]["num_classes"])}
    torch.save(old, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    return path


def test_old_checkpoint_needs_trust_and_converts(trained, tmp_path, capsys):
    tmp, ckpt = trained
    state = load_checkpoint(ckpt)
    old = _old_style(state, tmp_path / "old.pt")
    out = tmp_path / "pred"
    predict = ["predict", "--images", str(tmp / "images"), "--out", str(out), "--device", "cpu"]
    assert cli.main([*predict, "--checkpoint", str(old)]) == 2
    line = _one_line_error(capsys.readouterr(), old)
    assert "--trust-checkpoint" in line and "numpy" in line, line

    assert cli.main([*predict, "--checkpoint", str(old), "--trust-checkpoint"]) == 0
    assert (out / "labels" / "a.png").is_file()
    capsys.readouterr()

    new = tmp_path / "new.pt"
    assert cli.main(["convert-checkpoint", str(old), str(new)]) == 2
    assert "--trust-checkpoint" in _one_line_error(capsys.readouterr(), old)
    assert cli.main(["convert-checkpoint", str(old), str(new), "--trust-checkpoint"]) == 0
    converted = torch.load(new, weights_only=True)
    assert converted["assignment"] == [3, 1, 4, 0, 2] and converted["best_miou"] == 12.5
    assert converted["config"] == state["config"], "the config comes back as the same plain dict"
    for key, value in state["method"].items():
        assert torch.equal(converted["method"][key], value), key
    assert cli.main([*predict, "--checkpoint", str(new)]) == 0


def test_resume_skips_a_malicious_file_in_the_checkpoint_folder(trained, tmp_path, caplog):
    _, ckpt = trained
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(ckpt, folder / "step-00000002.pt")
    marker = tmp_path / "MARKER"
    torch.save({"step": 9, "method": RunsCode(marker), "config": {}, "meta": {}}, folder / "step-00000009.pt")
    (folder / "step-00000008.pt").write_bytes(b"half a file")
    state, path = load_latest_checkpoint(merge(RunConfig(), overrides=[f"train.output_dir={tmp_path / 'run'}"]))
    assert path == folder / "step-00000002.pt" and state["step"] == 2
    assert not marker.exists(), "the malicious checkpoint was executed"
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable checkpoint" in r.getMessage()]
    assert len(skipped) == 2 and "step-00000009.pt" in skipped[0], skipped


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Record:
    name: str
    value: float


def test_to_plain_converts_what_weights_only_refuses(tmp_path):
    messy = {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(3), "d": Record(name="x", value=np.float64(2)),
             "e": Path("/tmp/x"), "f": Colour.RED, "g": (1, np.int8(2)), "h": {3, 1}, "t": torch.ones(2),
             "o": collections.OrderedDict(w=torch.zeros(1))}
    plain = to_plain(messy)
    torch.save(plain, tmp_path / "p.pt")
    back = torch.load(tmp_path / "p.pt", weights_only=True)
    assert back["a"] == 3 and type(back["a"]) is int and back["c"] == [0, 1, 2]
    assert back["d"] == {"name": "x", "value": 2.0} and back["e"] == "/tmp/x" and back["f"] == "red"
    assert back["g"] == (1, 2) and back["h"] == [1, 3] and torch.equal(back["t"], torch.ones(2))
    assert isinstance(back["o"], collections.OrderedDict)
    with pytest.raises(TypeError, match=r"checkpoint\.x is a .*object"):
        to_plain({"x": object()})
    with pytest.raises(TypeError):
        save_checkpoint({"step": 1, "method": {}, "config": {}, "meta": {"x": lambda: 0}}, tmp_path / "q.pt")
    assert not (tmp_path / "q.pt").exists()


def test_newer_format_and_wrong_layout_are_refused(tmp_path):
    base = {"step": 1, "method": {"w": torch.zeros(1)}, "config": {}, "meta": {"feat_dim": 4, "num_classes": 2}}
    save_checkpoint(base, tmp_path / "ok.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 1
    torch.save({**base, FORMAT_KEY: 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer dist_seg"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save({**base, "method": {"w": 3}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_checkpoint(tmp_path / "odd.pt")


# ------------------------------------------------------------------------------- damaged checkpoints
def flip_tensor_bytes(path: Path, count: int = 4) -> None:
    """Invert ``count`` bytes in the middle of the largest tensor storage inside a torch zip checkpoint.

    torch stores each storage as an uncompressed zip member (``<archive>/data/<key>``), so the bytes are
    changed in place where the tensor's data lies and ``torch.load`` still accepts the file.
    """
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert member.compress_type == zipfile.ZIP_STORED, "torch stores tensor data uncompressed"
    with open(path, "r+b") as f:
        f.seek(member.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
        start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def _changed_tensors(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in a.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, torch.Tensor):
            if not torch.equal(value, b[key]) and not (value.isnan().any() and b[key].isnan().any()):
                out.append(name)
        elif isinstance(value, dict):
            out += _changed_tensors(value, b[key], name)
    return out


def test_flipped_bytes_inside_a_tensor_are_found_and_named(trained, tmp_path, capsys, caplog):
    """torch.load accepts a weight with 4 flipped bytes; the checksum written with the checkpoint does not:
    a named file is a one-line error, a run folder falls back to the previous valid checkpoint."""
    tmp, ckpt = trained
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    good, bad = folder / "step-00000002.pt", folder / "step-00000004.pt"
    shutil.copy(ckpt, good)
    state = torch.load(ckpt, weights_only=True)
    state["step"] = 4
    save_checkpoint(state, bad)
    flip_tensor_bytes(bad)

    damaged = torch.load(bad, weights_only=True)  # what made the bug: torch itself sees nothing wrong
    changed = _changed_tensors(damaged, load_checkpoint(good))
    changed = [n for n in changed if n not in ("step", "checksums")]
    assert len(changed) == 1, f"expected one changed tensor, got {changed}"
    with pytest.raises(DamagedCheckpointError, match=rf"tensor {changed[0]} does not match the checksum"):
        load_checkpoint(bad)

    assert cli.main(["eval", "--checkpoint", str(bad), "--out", str(tmp_path / "ev")]) == 2
    line = _one_line_error(capsys.readouterr(), bad)
    assert "is damaged" in line and changed[0] in line, line

    # Given the run folder, eval names the damaged newest checkpoint and scores the previous one.
    caplog.clear()
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run")]) == 0
    assert "stego (step 2)" in capsys.readouterr().out
    assert (tmp_path / "run" / "eval").is_dir(), "reports go to the run folder's eval/"
    skipped = [r.getMessage() for r in caplog.records if "skipping unreadable checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and str(bad) in skipped[0] and "is damaged" in skipped[0], skipped


def test_a_checkpoint_without_checksums_still_loads(trained, tmp_path):
    """Checkpoints written before checksums were (no 'checksums' entry) load unchecked."""
    _, ckpt = trained
    state = torch.load(ckpt, weights_only=True)
    assert set(state[CHECKSUM_KEY]) >= {f"method.{k}" for k in state["method"]}, "every tensor has a checksum"
    del state[CHECKSUM_KEY]
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["step"] == 2
