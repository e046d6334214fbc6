"""The toy-data results table of docs/results.md: STEGO and DS²DL against the raw-feature baseline.

Runs the documented command-line protocol, one process per run, on the built-in toy dataset:

* ``dist-seg prepare toy --out ROOT`` (skipped when ROOT already holds it);
* for every seed: ``dist-seg train recipes/stego_toy.py``, ``dist-seg train recipes/ds2dl_toy.py``, the
  same DS²DL recipe with ``ds2dl.affinity_target=code`` (SPEC §4's first reading, for comparison) and
  ``dist-seg eval --baselines raw --recipe recipes/stego_toy.py`` (the raw backbone features with only
  the probes trained, for the same number of steps as the STEGO recipe), each with ``data.root=ROOT
  train.seed=SEED train.output_dir=OUT/<method>_<SEED> tracking.enabled=false train.resume=false``;

then reads every run's final validation report (``eval/final.json`` of a training run,
``baselines/baseline_raw.json`` of the baseline; SPEC §6 protocol: flip averaging, Hungarian matching) and
prints a markdown table: cluster mIoU / Acc, linear-probe mIoU / Acc, and three collapse measures of the
predicted clusters over the validation pixels (``dist_seg.eval.metrics.cluster_balance``, from the cluster
confusion matrix's column sums): how many of the K clusters own at least one pixel, the assignment entropy
normalised by log K (1 = balanced, 0 = one cluster owns everything; the labels' own value is printed under
the table) and the smallest cluster's pixel share. A summary line per method gives the mean over seeds and
on how many seeds the method beats the baseline's cluster mIoU.

Examples::

    python tools/toy_results.py                                  # seeds 0 1 2, every row
    python tools/toy_results.py --seeds 0 --methods stego raw    # one seed, STEGO and the baseline
    python tools/toy_results.py --report-only --out runs/toy_results   # re-read finished runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dist_seg.eval.metrics import cluster_balance

RECIPES = {"stego": "recipes/stego_toy.py", "ds2dl": "recipes/ds2dl_toy.py", "ds2dl_code": "recipes/ds2dl_toy.py"}
# Overrides that define a row beyond its recipe: the first reading of SPEC §4 next to the revised one.
VARIANTS = {"ds2dl_code": ["ds2dl.affinity_target=code"]}
METHODS = ("stego", "ds2dl", "ds2dl_code", "raw")
LABELS = {"stego": "STEGO head", "ds2dl": "DS²DL", "ds2dl_code": "DS²DL, affinity_target=code",
          "raw": "raw features (baseline)"}


def _cli(*args: str) -> list[str]:
    # The console script `dist-seg` is `dist_seg.cli:main`; calling it through this interpreter keeps the
    # run on the same environment as the tool.
    return [sys.executable, "-m", "dist_seg.cli", *args]


def commands(method: str, seed: int, root: str, out: Path, extra: list[str]) -> list[str]:
    """The exact CLI command of one run (``method`` in stego / ds2dl / ds2dl_code / raw)."""
    common = [f"data.root={root}", f"train.seed={seed}", f"train.output_dir={out / f'{method}_{seed}'}",
              "tracking.enabled=false", "train.resume=false", *VARIANTS.get(method, []), *extra]
    if method == "raw":
        return _cli("eval", "--baselines", "raw", "--recipe", RECIPES["stego"], *common)
    return _cli("train", RECIPES[method], *common)


def report_path(method: str, seed: int, out: Path) -> Path:
    run = out / f"{method}_{seed}"
    return run / "baselines" / "baseline_raw.json" if method == "raw" else run / "eval" / "final.json"


def read_row(path: Path) -> dict:
    """Scores of one finished run from its JSON report; the collapse measures come from its confusion."""
    data = json.loads(path.read_text())
    confusion = data["cluster_confusion"]  # rows: classes, columns: clusters
    balance = cluster_balance(confusion)
    linear = data.get("linear") or {}
    return {
        "cluster_mIoU": data["cluster"]["mIoU"], "cluster_Acc": data["cluster"]["Acc"],
        "linear_mIoU": linear.get("mIoU"), "linear_Acc": linear.get("Acc"),
        "clusters_used": balance["clusters_used"], "clusters": len(confusion[0]),
        "cluster_entropy": balance["cluster_entropy"], "cluster_min_share": balance["cluster_min_share"],
        "class_entropy": balance["class_entropy"],
    }


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown(rows: dict[tuple[str, int], dict], methods: list[str], seeds: list[int]) -> str:
    lines = ["| method | seed | cluster mIoU | cluster Acc | linear mIoU | linear Acc | clusters used | "
             "assignment entropy / log K | smallest cluster share (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for seed in seeds:
            r = rows.get((method, seed))
            if r is None:
                lines.append(f"| {LABELS[method]} | {seed} | (missing) | | | | | | |")
                continue
            entropy = "–" if r["cluster_entropy"] is None else f"{r['cluster_entropy']:.2f}"
            lines.append(f"| {LABELS[method]} | {seed} | {_fmt(r['cluster_mIoU'])} | {_fmt(r['cluster_Acc'])} | "
                         f"{_fmt(r['linear_mIoU'])} | {_fmt(r['linear_Acc'])} | "
                         f"{r['clusters_used']} / {r['clusters']} | {entropy} | {_fmt(r['cluster_min_share'])} |")
    lines.append("")
    for method in methods:
        vals = [rows[(method, s)]["cluster_mIoU"] for s in seeds if (method, s) in rows]
        if not vals:
            continue
        line = f"- {LABELS[method]}: mean cluster mIoU {sum(vals) / len(vals):.1f} over {len(vals)} seed(s)"
        if method != "raw" and "raw" in methods:
            wins = [s for s in seeds if (method, s) in rows and ("raw", s) in rows
                    and rows[(method, s)]["cluster_mIoU"] > rows[("raw", s)]["cluster_mIoU"]]
            line += f"; beats the raw baseline on {len(wins)} of {len(vals)} seed(s)"
        lines.append(line)
    labels = [r["class_entropy"] for r in rows.values() if r.get("class_entropy") is not None]
    if labels:
        lines.append(f"- label histogram of the validation pixels: entropy / log K {labels[0]:.2f} "
                     "(what a perfect clustering would show)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/toy", help="toy dataset folder (generated if absent)")
    parser.add_argument("--out", default="runs/toy_results", help="folder of the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--report-only", action="store_true", help="only read the reports of finished runs")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    env = dict(os.environ, TQDM_DISABLE="1")

    if not args.report_only:
        if not (Path(args.root) / "manifest.json").is_file():
            subprocess.run(_cli("prepare", "toy", "--out", args.root), check=True, env=env)
        for seed in args.seeds:
            for method in args.methods:
                cmd = commands(method, seed, args.root, out, args.overrides)
                print("$", shlex.join(["dist-seg", *cmd[3:]]), flush=True)
                start = time.perf_counter()
                done = subprocess.run(cmd, env=env)
                if done.returncode:
                    print(f"error: the run above exited with {done.returncode}", file=sys.stderr)
                    return done.returncode
                print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)

    rows = {}
    for seed in args.seeds:
        for method in args.methods:
            path = report_path(method, seed, out)
            if path.is_file():
                rows[(method, seed)] = read_row(path)
            else:
                print(f"warning: no report at {path}", file=sys.stderr)
    table = markdown(rows, args.methods, args.seeds)
    cpu = platform.processor() or platform.machine()
    stamp = f"{dt.date.today().isoformat()}, {platform.node()} ({os.cpu_count()} CPUs, {cpu})"
    print(f"\ntoy validation, SPEC §6 protocol ({stamp})\n")
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
