"""tools/tune_ds2dl_toy.py: the recipe choice reads only the toy *training* split (fit / held-out cut)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from dist_seg.data.toy import generate_toy

TOOL = Path(__file__).resolve().parent.parent / "tools" / "tune_ds2dl_toy.py"


def test_tuning_tool_scores_held_out_training_images_only(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tune_ds2dl_toy_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool
    spec.loader.exec_module(tool)
    root = tmp_path / "toy"
    generate_toy(root, num_classes=5, num_train=24, num_val=8, size=64, seed=0, samples_per_shard=8)
    fit, held = tool.load_split(str(root), 16, tool.torch.device("cpu"))
    assert fit["feat"].shape[0] == 16 and held["feat"].shape[0] == 8, "the training split is cut into fit / held-out"
    # the validation split is never read: removing it does not stop the tool
    import shutil

    shutil.rmtree(root / "val")
    code = tool.main(["--root", str(root), "--fit", "16", "--seeds", "3", "--steps", "2", "--batch", "4",
                      "--candidate", "ds2dl.optimizer=adam", "ds2dl.feature_samples=3"])
    out = capsys.readouterr().out
    assert code == 0 and "score on 8 held-out training images" in out
    line = next(x for x in out.splitlines() if x.startswith("ds2dl.optimizer=adam"))
    assert "cluster mIoU" in line and "used (entropy/log K, min share)" in line, line
