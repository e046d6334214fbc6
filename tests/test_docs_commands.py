"""Every command the documentation shows is one the CLI accepts; the toy ones run for real.

Collected from README.md and docs/*.md (not docs/decisions.md: a log of past decisions that quotes commands
as they were when each was taken):

* every line of a code block (fenced, or indented by 4 spaces) that runs ``dist-seg ...`` or
  ``accelerate launch ...`` (leading ``VAR=value`` words, ``\\`` continuations and ``$VAR`` of an assignment
  earlier in the block are applied; ``# comments`` are dropped);
* every inline code span of the prose that holds such a command.

Each is checked against the CLI's own parsers: ``dist_seg.cli.parse_args`` (subcommand, flags, positionals),
``key=value`` overrides merged onto the recipe's config (or onto :class:`RunConfig`), sweep files through
``parse_sweep``, ``accelerate launch`` through Accelerate's own ``launch_command_parser``, and every repository
path (``recipes/``, ``launch/``, ``tools/``, ...) must exist. The documents' own notation is expanded first:
``[optional parts]`` are included, ``a|b`` and ``{a,b}`` give one command per alternative, ``...`` is dropped,
and the placeholders of :data:`PLACEHOLDERS` / :data:`PLACEHOLDER_FILES` stand for a real value (each with its
reason). A span that only names a command (``dist-seg train``, ``dist-seg prepare voc12``) is checked as a
mention: the subcommand exists, and so do its flags and keys.

Then every collected command is either run here (:data:`RUNS`: on the built-in toy data with small step
counts, or where a real dataset is missing, expecting the one-line data error), or listed in :data:`NOT_RUN`
with the reason (another test runs it, real datasets, GPUs, several nodes, SLURM). A new documented command
that is neither fails :func:`test_every_documented_command_is_run_or_has_a_reason`.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dist_seg import cli
from dist_seg.config import ConfigError, RunConfig
from dist_seg.sweeps.spec import SweepError, SweepSpec, _config_field_type, base_config, parse_sweep

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "decisions.md")]

# Placeholder words of the docs' command templates and the value each stands for while checking.
PLACEHOLDERS = {
    "RECIPE": "recipes/stego_toy.py",  # "any recipe"
    "DATASET": "cocostuff27",  # `dist-seg prepare DATASET --src SOURCE`: a benchmark converter
    "SRC": "SRC", "SOURCE": "SRC", "DIR": "DIR", "FILE": "FILE", "SBD": "SBD", "NAME": "NAME", "EXPR": "EXPR",
    "PATH": "PATH", "MAIN": "MAIN", "<support_root>": "DIR",
    "N": "2", "K": "3", "M": "2", "W": "2", "S": "train", "SEED": "0", "R": "0.5",
    "i": "0",  # scaling.md: `--machine_rank i` on node i
}
# Placeholder files (the docs' "X") and the real file that stands for them.
PLACEHOLDER_FILES = {
    "recipes/X.py": "recipes/stego_toy.py",  # "any recipe"
    "recipes/maskdistill_X.py": "recipes/maskdistill_toy.py",  # "any MaskDistill recipe"
    "launch/X.yaml": "launch/cpu_2proc.yaml",  # "any launch config"
    "script.py": "recipes/stego_toy.py",  # scaling.md: DeepSpeed's config with "a training script"
}
# Placeholders whose value depends on the option before them.
OPTION_VALUES = {"--size": "96", "--crop-ratio": "0.5", "--image-format": "jpg"}
REPO_DIRS = ("recipes/", "launch/", "tools/", "tests/", "docs/", "dist_seg/")
SHRINK = ["train.num_steps=2", "train.val_every=2", "train.checkpoint_every=2", "train.log_every=1",
          "data.num_workers=0", "data.batch_size=8", "stego.feature_samples=4", "tracking.enabled=false",
          "eval.num_overlays=0"]


@dataclass(frozen=True)
class DocCommand:
    where: str  # README.md:39
    text: str  # as written, one line
    inline: bool  # a span of the prose (may only name the command)

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text, comments=True)

    @property
    def key(self) -> str:
        """The command as one normalised line (comments dropped, spaces collapsed)."""
        return " ".join(self.words)


# ------------------------------------------------------------------------------------------- collection
def _is_command(words: list[str]) -> bool:
    words = list(itertools.dropwhile(lambda w: re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w), words))
    return bool(words) and (words[0] == "dist-seg" or words[:2] == ["accelerate", "launch"])


def _split(text: str) -> list[str] | None:
    try:
        return shlex.split(text, comments=True)
    except ValueError:
        return None


def collect(path: Path, text: str | None = None) -> list[DocCommand]:
    """The documented commands of one Markdown file (``text``: its content, if not read from ``path``)."""
    lines = (path.read_text() if text is None else text).splitlines()
    out: list[DocCommand] = []
    fenced, env, pending, start = False, {}, "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fenced, env = not fenced, {}
            continue
        # An indented code block (4 spaces) is told from indented prose by what it holds: a command.
        indented = raw.startswith("    ") and (pending or _is_command(_split(stripped.rstrip("\\")) or []))
        if fenced or indented:
            if not pending:
                start = number
            pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
            if stripped.endswith("\\"):
                continue
            line, pending = pending, ""
            assignment = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=(\S.*)", line)
            if assignment and _split(assignment.group(2)) is not None and len(_split(line)) == 1:
                env[assignment.group(1)] = _split(assignment.group(2))[0]
                continue
            line = re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m, env=env: env.get(m.group(1), m.group(0)), line)
            words = _split(line)
            if words and _is_command(words):
                out.append(DocCommand(f"{path.name}:{start}", line, inline=False))
            continue
        for span in re.findall(r"`([^`]+)`", raw):
            at = span.find("dist-seg ") if "dist-seg " in span else span.find("accelerate launch ")
            if at >= 0 and _split(span[at:]) and _is_command(_split(span[at:])):
                out.append(DocCommand(f"{path.name}:{number}", span[at:], inline=True))
    return out


def documented_commands() -> list[DocCommand]:
    return [c for path in DOCS for c in collect(path)]


# ------------------------------------------------------------------------------------------- notation
def expand(words: list[str]) -> list[list[str]]:
    """The concrete commands a template stands for: optional ``[...]`` parts included, one command per
    alternative of ``a|b`` / ``{a,b}``, ``...`` dropped, placeholders replaced."""
    choices: list[list[str]] = []  # one list of alternatives per word
    previous = ""
    for word in words:
        word = word.lstrip("[") if word.startswith("[") else word
        word = word[:-1] if word.endswith("]") and "[" not in word else word
        if word in ("...", "…", "key=value", ""):
            continue
        if previous in OPTION_VALUES and word in PLACEHOLDERS:
            word = OPTION_VALUES[previous]
        word = PLACEHOLDER_FILES.get(word, PLACEHOLDERS.get(word, word))
        if "=" not in word and ("|" in word or re.fullmatch(r"\{[\w,]+\}", word)):
            choices.append(word.strip("{}").replace(",", "|").split("|"))
        else:
            choices.append([word])
        previous = word
    return [list(combo) for combo in itertools.product(*choices)]


# ------------------------------------------------------------------------------------------- checking
def _subparser(parser, name):
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices.get(name)


def _config_key_error(key: str) -> str | None:
    try:
        _config_field_type(key)
    except SweepError as err:
        return str(err)
    return None


def check_mention(words: list[str], parser) -> list[str]:
    """A span that only names a command: the subcommand exists, and so do its flags and keys."""
    sub = _subparser(parser, words[1]) if len(words) > 1 else None
    if sub is None:
        return [f"unknown subcommand {words[1:2]}"]
    subs = [sub]
    if words[1] == "prepare":
        datasets = next(a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction").choices
        named = words[2] if len(words) > 2 and not words[2].startswith("-") else None
        if named is not None and named not in datasets:
            return [f"unknown dataset {named!r} of dist-seg prepare"]
        subs = [datasets[named]] if named else list(datasets.values())
    errors = []
    for word in words[2:]:
        if word.startswith("--") and not any(word.split("=")[0] in s._option_string_actions for s in subs):
            errors.append(f"no option {word} in `dist-seg {words[1]}`")
        elif "=" in word and not word.startswith("-") and words[1] != "sweep":
            problem = _config_key_error(word.split("=", 1)[0])
            if problem:
                errors.append(problem)
    return errors


def _repo_files(words: list[str]) -> list[str]:
    """Repository paths (``recipes/...``, ``launch/...``; also as an override's value) that do not exist."""
    errors = []
    for word in words:
        value = word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word
        if value.startswith(REPO_DIRS) and not (REPO / value).exists():
            errors.append(f"{value} does not exist in the repository")
    return errors


def check_dist_seg(words: list[str], parser) -> list[str]:
    """Full check of ``dist-seg ...``: the CLI's parser, then the overrides / sweep file it would read."""
    from dist_seg.runtime import load_recipe, resolve_config

    try:
        args = cli.parse_args(words[1:], parser)
    except SystemExit:
        return [f"`dist-seg` refuses the arguments {words[1:]} (see its usage message above)"]
    errors = []
    try:
        if words[1] == "sweep":
            if Path(args.sweep).suffix and (REPO / args.sweep).is_file():
                base_config(parse_sweep(REPO / args.sweep, args.overrides))
            else:  # a template (`dist-seg sweep FILE`): the overrides must still name sweep keys
                fields = {f for f in SweepSpec.__dataclass_fields__}
                errors += [f"{o} is not a key of the sweep file" for o in args.overrides
                           if o.split("=", 1)[0].split(".")[0].rstrip("+") not in fields]
        elif hasattr(args, "overrides"):
            recipe = getattr(args, "recipe", None)
            base = load_recipe(REPO / recipe)() if recipe and recipe.endswith(".py") else (
                load_recipe(recipe)() if recipe else RunConfig())
            argv = [x for path in getattr(args, "config", None) or [] for x in ("--config", path)]
            resolve_config(base, argv + list(args.overrides))
    except (ConfigError, SweepError) as err:
        errors.append(str(err))
    return errors


def check_accelerate(words: list[str], *, inline: bool = False) -> list[str]:
    """Full check of ``accelerate launch ...``: Accelerate's parser, the script, the recipe's overrides.

    A span of the prose without a script (``accelerate launch --cpu --num_processes 2``) is a mention: its
    flags must be Accelerate's."""
    from accelerate.commands.launch import launch_command_parser

    from dist_seg.runtime import load_recipe, resolve_config

    words = list(itertools.dropwhile(lambda w: "=" in w and not w.startswith("-"), words))
    if inline and not any(w.endswith(".py") for w in words):
        known = launch_command_parser()._option_string_actions
        return [f"no option {w} in `accelerate launch`" for w in words[2:] if w.startswith("-") and w not in known]
    try:
        args = launch_command_parser().parse_args(words[2:])
    except SystemExit:
        return [f"`accelerate launch` refuses {words[2:]}"]
    script = args.training_script
    if args.module:  # `accelerate launch -m dist_seg.cli predict ...`: the module's own parser checks the rest
        if not (REPO / (script.replace(".", "/") + ".py")).is_file():
            return [f"module {script} does not exist in the repository"]
        if script == "dist_seg.cli":
            try:
                cli.parse_args(args.training_script_args)
            except SystemExit:
                return [f"dist-seg refuses {args.training_script_args}"]
        return []
    if not (REPO / script).is_file():
        return [f"training script {script} does not exist in the repository"]
    if script.startswith("recipes/"):
        try:
            resolve_config(load_recipe(REPO / script)(), args.training_script_args)
        except ConfigError as err:
            return [str(err)]
    return []


def check(command: DocCommand, parser) -> list[str]:
    """Everything wrong with one documented command (empty when the CLI accepts every form of it)."""
    words = command.words
    words = list(itertools.dropwhile(lambda w: re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w), words))
    errors = []
    for variant in expand(words):
        errors += _repo_files(variant)
        if variant[0] == "accelerate":
            errors += check_accelerate(variant, inline=command.inline)
        elif command.inline and _is_mention(variant):
            errors += check_mention(variant, parser)
        else:
            errors += check_dist_seg(variant, parser)
    return [f"{command.where}: `{command.text}`: {e}" for e in dict.fromkeys(errors)]


def _is_mention(words: list[str]) -> bool:
    """``dist-seg CMD`` alone, ``dist-seg prepare DATASET`` or a span whose other words are all options."""
    rest = words[3:] if len(words) > 2 and words[1] == "prepare" else words[2:]
    return len(words) <= 2 or all(w.startswith("-") for w in rest) or (words[1] == "prepare" and len(words) <= 3)


@pytest.fixture(scope="module")
def parser():
    return cli.build_parser()


@pytest.fixture(scope="module")
def commands():
    found = documented_commands()
    assert len(found) > 40, f"the collector found only {len(found)} documented commands"
    return found


def test_every_documented_command_parses(commands, parser):
    errors = [e for c in commands for e in check(c, parser)]
    assert not errors, "documented commands the CLI refuses:\n" + "\n".join(errors)


# ------------------------------------------------------------------------------ the checker can fail
README_LINE = "dist-seg prepare folder --images my_images/ --out data/mine  # any folder of images"


@pytest.mark.parametrize("change, expected", [
    (("--images", "--imgs"), "refuses"),  # a flag renamed in the CLI (or misspelt in the README)
    (("folder", "folders"), "refuses"),  # a subcommand that does not exist
    (("--out data/mine", "--out data/mine stego.lrr=1"), "refuses"),  # prepare takes no overrides
])
def test_checker_fails_on_a_changed_readme_line(tmp_path, parser, change, expected):
    readme = (REPO / "README.md").read_text()
    assert README_LINE in readme, "the README line this test edits has changed; pick another"
    modified = tmp_path / "README.md"
    modified.write_text(readme.replace(README_LINE, README_LINE.replace(*change)))
    errors = [e for c in collect(modified) if c.text.startswith("dist-seg prepare folder") for e in check(c, parser)]
    assert errors and expected in errors[0], errors


@pytest.mark.parametrize("line, expected", [
    ("dist-seg train recipes/stego_toy.py stego.lrr=1", "lrr"),  # unknown config key
    ("dist-seg train recipes/stego_toy.py train.num_steps=abc", "num_steps"),  # wrong type
    ("accelerate launch recipes/no_such.py", "does not exist"),  # a file that is not in the repo
    ("accelerate launch --num_procs 2 recipes/stego_toy.py", "refuses"),  # not an accelerate flag
    ("dist-seg knn data.root=data/toy backbone.name=toy", "recipe not found"),  # the review's README:76
    ("dist-seg sweep recipes/sweep.yaml data.root=/data", "overrides+="),  # a run key given to a sweep
])
def test_checker_fails_on_wrong_commands(tmp_path, parser, line, expected):
    doc = tmp_path / "doc.md"
    doc.write_text(f"```bash\n{line}\n```\n")
    (command,) = collect(doc)
    errors = check(command, parser)
    assert errors and expected in " ".join(errors), errors


def test_collector_reads_the_docs_notation(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("Run `dist-seg runs [--csv|--json]` or\n\n```bash\nC=\"train.seed=1 data.num_workers=0\"\n"
                   "dist-seg train recipes/stego_toy.py $C \\\n    stego.lr=1e-3   # comment\n```\n\n"
                   "    accelerate launch recipes/stego_toy.py\n")
    found = collect(doc)
    assert [c.key for c in found] == [
        "dist-seg runs [--csv|--json]",
        "dist-seg train recipes/stego_toy.py train.seed=1 data.num_workers=0 stego.lr=1e-3",
        "accelerate launch recipes/stego_toy.py"]
    assert [c.where for c in found] == ["doc.md:1", "doc.md:5", "doc.md:9"]
    assert expand(found[0].words) == [["dist-seg", "runs", "--csv"], ["dist-seg", "runs", "--json"]]


# ------------------------------------------------------------------------------ run, or say why not
# Documented commands run here: normalised command (see DocCommand.key) -> what to expect.
# "ok": runs on the toy data (SHRINK appended); "no data": a real dataset that is missing here, so the
# command must stop with the one-line data error (exit 2).
RUNS = {
    "dist-seg prepare toy --out data/toy": "ok",
    "dist-seg check-data data/toy": "ok",
    "accelerate launch recipes/stego_toy.py train.num_steps=100 tracking.enabled=false": "ok",
    "dist-seg knn recipes/stego_toy.py data.root=data/toy": "ok",
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/stego_toy.py": "ok",
    "accelerate launch recipes/stego_coco.py": "no data",
    "accelerate launch recipes/ds2dl_coco.py": "no data",
    "dist-seg train recipes/stego_potsdam.py train.seed=1": "no data",
    # docs/predict.md, after the toy run (its last checkpoint stands in for the docs' step 300; my_images/ is made)
    "dist-seg predict --checkpoint runs/stego_toy/checkpoints/step-00000300.pt "
    "--images my_images/ --out preds/": "ok",
    "dist-seg predict --checkpoint runs/stego_toy/checkpoints/step-00000300.pt "
    "--images my_images --out preds/folder --areas": "ok",
    "dist-seg predict --checkpoint runs/stego_toy/checkpoints/step-00000300.pt "
    "--shards data/toy/val --out preds/val --no-overlays": "ok",
    "dist-seg predict --checkpoint runs/stego_toy/checkpoints/step-00000300.pt "
    "--images my_images --out preds/huge --max-pixels 0 --num-workers 0": "ok",
    "dist-seg predict --checkpoint runs/stego_toy/checkpoints/step-00000300.pt "
    "--images my_images --out preds/tiles --tile 64 --stride 32": "ok",
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m dist_seg.cli predict --checkpoint "
    "runs/stego_toy/checkpoints/step-00000300.pt --images my_images --out preds/ranks": "ok",
    "dist-seg predict --checkpoint runs/stego_toy/checkpoints/step-00000300.pt "
    "--images my_images --out preds/ray --ray --num-actors 2": "ok",
    "dist-seg maskdistill maskdistill_voc maskdistill.detect.weights=R50.pth "
    "maskdistill.distil.weights=R50.pth": "no data",
    "dist-seg maskdistill maskdistill_coco20k maskdistill.detect.weights=R50.pth "
    "maskdistill.distil.weights=R50.pth": "no data",
}
# Documented commands not run here, matched by regular expression (first match wins), with the reason.
NOT_RUN = [
    (r"^dist-seg prepare (cocostuff27|cityscapes27|potsdam3|voc12|coco20k|\{)", "needs the real dataset's files "
     "(tests/test_convert_*.py convert generated trees of the same layout)"),
    (r"^dist-seg prepare (DATASET|…|\.\.\.)", "a template of the prepare command (checked as a mention)"),
    (r"^dist-seg prepare (folder|toy_objects)", "tests/test_data_toy_folder.py and test_data_toy_objects.py run them"),
    (r"^dist-seg prepare toy$", "a mention of the command the run above executes"),
    (r"^dist-seg prepare$", "a mention of the command (the toy prepare line runs above)"),
    (r"^accelerate launch --multi_gpu -m dist_seg\.cli predict", "needs GPUs (docs/predict.md's CPU form of it runs "
     "above; tests/test_predict.py runs two gloo ranks)"),
    (r"--config_file launch/(multi_gpu|single_gpu|deepspeed_zero2)\.yaml", "needs GPUs"),
    (r"--config_file launch/multi_node\.yaml", "needs several nodes"),
    (r"^accelerate launch --cpu --num_processes 2$", "scaling.md names this form to warn that it starts one process"),
    (r"launch/cpu_2proc\.yaml|launch/X\.yaml|check_ranks\.py", "tests/test_launch_configs.py launches it on 2 "
     "CPU processes"),
    (r"^dist-seg sweep recipes/sweep\.yaml", "needs COCO-Stuff and GPUs (tests/test_cli_errors.py runs it without "
     "them: the data error at once)"),
    (r"^dist-seg sweep", "a Ray sweep: tests/test_tune.py runs recipes/sweep_toy.yaml end to end (marked slow)"),
    (r"^dist-seg eval --checkpoint", "tests/test_eval_predict.py evaluates a trained checkpoint (with --crf too)"),
    (r"^dist-seg eval --baselines", "tests/test_eval_predict.py::test_baselines_table_from_one_command"),
    (r"^dist-seg eval", "a mention; tests/test_eval_predict.py runs eval"),
    (r"^dist-seg predict", "a mention (the documented predict lines run above; tests/test_predict.py)"),
    (r"^dist-seg runs", "tests/test_runs_table.py reads a real MLflow store"),
    (r"^dist-seg convert-checkpoint", "tests/test_checkpoints.py converts an old-format checkpoint"),
    (r"^dist-seg maskdistill (maskdistill_toy|RECIPE)|maskdistill_(toy|X)\.py",
     "tests/test_pipeline_maskdistill.py runs every stage of maskdistill_toy (CLI and 2 ranks)"),
    (r"^dist-seg maskdistill$", "a mention of the pipeline command (the recipes' lines above run)"),
    (r"^dist-seg check-data( ROOT|$)", "a template of the check-data line README runs above "
     "(tests/test_damaged_shards.py checks damaged shards and caches)"),
    (r"^dist-seg (masks|name|detect|pseudo)", "tests/test_maskdistill_*.py and test_pipeline_detect.py run the "
     "stages"),
    (r"^dist-seg train recipes/(stego|ds2dl)_toy\.py", "README's `dist-seg runs` example: the same toy training "
     "as the recipe runs above, tests/test_trainer.py"),
    (r"^dist-seg train", "a mention of the command (tests/test_trainer.py)"),
    (r"^dist-seg (extract|knn)", "a template; tests/test_knn.py and test_trainer.py build tables and caches"),
]


def _reason(key: str) -> str | None:
    return next((why for pattern, why in NOT_RUN if re.search(pattern, key)), None)


def test_every_documented_command_is_run_or_has_a_reason(commands):
    missing = sorted({f"{c.where}: {c.key}" for c in commands if c.key not in RUNS and _reason(c.key) is None})
    assert not missing, "documented commands neither run by this test nor listed in NOT_RUN:\n" + "\n".join(missing)
    keys = {c.key for c in commands}
    stale = sorted(k for k in RUNS if k not in keys)
    assert not stale, f"RUNS lists commands the docs no longer show: {stale}"


def _stand_in_for_the_docs_predict_inputs(root: Path) -> None:
    """docs/predict.md's inputs: a few images in my_images/, and the toy run's last checkpoint (2 steps here)
    under the name of the docs' 300-step one."""
    import shutil

    import numpy as np
    from PIL import Image

    from dist_seg.data.toy import toy_sample

    (root / "my_images" / "sub").mkdir(parents=True)
    for i, (name, size) in enumerate([("a.png", (64, 80)), ("b.jpg", (96, 64)), ("sub/c.png", (48, 48))]):
        image = toy_sample(i, split="val", size=64, num_classes=5, seed=0).image
        Image.fromarray(np.asarray(image)).resize(size[::-1]).save(root / "my_images" / name)
    checkpoints = root / "runs" / "stego_toy" / "checkpoints"
    shutil.copy(sorted(checkpoints.glob("step-*.pt"))[-1], checkpoints / "step-00000300.pt")


def _run_in_process(words: list[str], capsys) -> tuple[int, str, str]:
    from dist_seg.runtime import load_recipe
    from dist_seg.trainer import run_recipe

    if words[0] == "dist-seg":
        code = cli.main(words[1:])
    else:  # `accelerate launch recipes/X.py ...` with one process: the recipe's own entry point
        code = run_recipe(load_recipe(REPO / words[2]), words[3:])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_documented_toy_commands_run(commands, tmp_path, monkeypatch, capsys):
    """The commands of RUNS, as written (plus SHRINK), from a fresh folder: toy data, a STEGO run, the KNN
    stage, two CPU ranks; and the real-dataset ones stop at once with the data error."""
    import logging

    logging.getLogger("dist_seg").handlers.clear()  # log to this test's stderr
    monkeypatch.chdir(tmp_path)
    for name in ("recipes", "launch"):
        (tmp_path / name).symlink_to(REPO / name)
    documented = {c.key: c for c in commands}
    for key, expect in RUNS.items():
        words = documented[key].words
        if key.startswith("dist-seg prepare toy"):
            words = [*words, "--num-train", "32", "--num-val", "8", "--samples-per-shard", "4"]
        elif expect == "ok" and words[:2] != ["dist-seg", "check-data"]:  # check-data takes no overrides
            words = [*words, *SHRINK]
        if "predict" in words and not (tmp_path / "my_images").is_dir():
            _stand_in_for_the_docs_predict_inputs(tmp_path)
        if words[0].startswith("ACCELERATE_USE_CPU="):
            env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *words[3:]], env=env,
                                  capture_output=True, text=True, timeout=600)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
            assert code == 0, f"{key}:\n{err[-3000:]}"
            if "predict" in words:
                assert out.count("wrote 3 label map(s)") == 1, f"rank 0 reports the sum once:\n{out}"
                continue
            assert out.count("validation after 2 steps") == 1, f"the final table is printed once, by rank 0:\n{out}"
            continue
        code, out, err = _run_in_process(words, capsys)
        if expect == "ok":
            assert code == 0, f"{key} failed:\n{err[-3000:]}"
        else:
            errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
            assert code == 2 and len(errors) == 1 and "no dataset at" in errors[0], f"{key}: {code}\n{err[-3000:]}"
            assert "Traceback" not in err, err
    assert (tmp_path / "runs" / "stego_toy" / "checkpoints" / "step-00000002.pt").is_file()
