"""Every benchmark converter answers a source tree in the wrong layout the same way: what it expected, where,
how to get it, and the section of docs/datasets.md that says more (the section must exist)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist_seg import cli

REPO = Path(__file__).resolve().parents[1]


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


@pytest.mark.parametrize("dataset, expected", [
    ("cocostuff27", "train2017"),
    ("cityscapes27", "leftImg8bit"),
    ("potsdam3", "imgs"),
    ("voc12", "VOCdevkit/VOC2012"),
    ("coco20k", "train2014"),
])
@pytest.mark.parametrize("tree", ["missing", "empty", "unrelated"])
def test_wrong_layout_gets_the_same_kind_of_message(dataset, expected, tree, tmp_path, capsys):
    src = tmp_path / "src"
    if tree != "missing":
        src.mkdir()
    if tree == "unrelated":  # a folder of images, not the benchmark's layout
        (src / "photos").mkdir()
        (src / "photos" / "a.jpg").write_bytes(b"")
    assert cli.main(["prepare", dataset, "--src", str(src), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    pattern = rf"^dist-seg prepare {dataset}: {dataset}(/\w+)?: expected .*{re.escape(str(src))}.*{expected}.* " \
              rf"\(not found\)\. .* See docs/datasets\.md#([\w-]+) for the source layout and where to get it\.$"
    match = re.match(pattern, err)
    assert match, f"message does not follow the common shape:\n{err}"
    assert match.group(2) in _anchors((REPO / "docs" / "datasets.md").read_text()), \
        f"docs/datasets.md has no section #{match.group(2)}"
    assert not (tmp_path / "out").exists(), "nothing is written before the layout is checked"
