"""What every stage needs to start: logging, the Accelerator, loading a recipe, resolving a config.

Imported by the stages (``extract``, ``knn``, ``train``, ``eval``, ``sweep``, ...); it imports none of
them, so any stage can start without pulling in the trainer (see ARCHITECTURE.md, "Layout").
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Union

from dist_seg.config import ConfigError, RunConfig, merge

PathLike = Union[str, os.PathLike]
# Recipes shipped with the project (``recipes/`` beside the package), for names such as ``stego_toy``.
PROJECT_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The recipe a process last loaded: what MLflow records as the source of the runs it starts (mlflow.source.name).
SOURCE_ENV = "DIST_SEG_SOURCE"


def setup_logging() -> None:
    """Log ``dist_seg.*`` messages to stderr (once; later calls change nothing)."""
    if not logging.getLogger("dist_seg").handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logging.getLogger("dist_seg").addHandler(handler)
        logging.getLogger("dist_seg").setLevel(logging.INFO)


def make_accelerator(cfg: RunConfig):
    """The run's ``accelerate.Accelerator`` (device, processes, mixed precision, DDP settings)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(mixed_precision=cfg.train.mixed_precision,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def default_cache_dir(cfg: RunConfig) -> str:
    """Where ``dist-seg extract`` writes the feature cache when ``data.feature_cache`` is not set."""
    return str(Path(cfg.data.root) / "features" / f"{cfg.backbone.name}_{cfg.data.res}")


def recipe_candidates(path_or_name: PathLike, *, search: Iterable[PathLike] = ()) -> list[Path]:
    """The files ``load_recipe`` tries, in order.

    A path (``recipes/stego_toy.py``) is tried against each folder of ``search`` (a relative path in a sweep
    file means the sweep file's folder, then its project root), then as given (the working directory). A bare
    name (``stego_toy``) is looked up as ``recipes/<name>.py`` in the same places, then among the project's
    shipped recipes.
    """
    text = os.fspath(path_or_name)
    path = Path(text)
    bases = [Path(b) for b in search]
    if path.suffix:
        if path.is_absolute():
            return [path]
        tried = [b / path for b in bases] + [path]
    else:
        rel = Path("recipes") / f"{text}.py"
        tried = [b / rel for b in bases] + [rel, PROJECT_RECIPES / f"{text}.py"]
    unique: list[Path] = []
    for p in tried:
        if p not in unique:
            unique.append(p)
    return unique


def load_recipe(path_or_name: PathLike, *, search: Iterable[PathLike] = ()) -> Callable[[], RunConfig]:
    """The ``config()`` function of a recipe file (``recipes/stego_toy.py``) or name (``stego_toy``).

    Args:
        path_or_name: a recipe file or the name of one.
        search: folders to resolve a relative path against before the working directory (see
            :func:`recipe_candidates`).

    Raises:
        ConfigError: no such recipe (the message lists every place tried), or it defines no ``config()``.
    """
    candidates = recipe_candidates(path_or_name, search=search)
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        places = ", ".join(str(c if c.is_absolute() else Path.cwd() / c) for c in candidates)
        raise ConfigError(f"recipe not found: {os.fspath(path_or_name)} (tried {places}; give a path such as "
                          f"recipes/stego_toy.py)")
    spec = importlib.util.spec_from_file_location(f"dist_seg_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} defines no config() function")
    os.environ[SOURCE_ENV] = str(path.resolve())
    return module.config


def resolve_config(base: RunConfig, argv: Sequence[str]) -> RunConfig:
    """``--config a.yaml`` files and ``key=value`` overrides from ``argv`` merged onto ``base``."""
    yaml_files, overrides = [], []
    it = iter(argv)
    for item in it:
        if item == "--config":
            yaml_files.append(next(it))
        elif item.startswith("--config="):
            yaml_files.append(item.split("=", 1)[1])
        else:
            overrides.append(item[2:] if item.startswith("--") else item)
    return merge(base, yaml_files=yaml_files, overrides=overrides)


def add_recipe_arguments(parser, *, overrides_help: str = "config overrides key.sub=value") -> None:
    """``RECIPE``, ``--config FILE.yaml`` (repeatable) and trailing ``key=value`` overrides.

    The arguments of every recipe-driven command (``train``, ``extract``, ``knn``, the MaskDistill stages);
    :func:`config_from_args` turns them into the run config.
    """
    parser.add_argument("recipe", help="recipe file or name, e.g. recipes/stego_toy.py or stego_toy")
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML config merged onto the recipe before the overrides (repeatable)")
    parser.add_argument("overrides", nargs="*", help=overrides_help)


def recipe_argv(args) -> list[str]:
    """``--config`` files and overrides of :func:`add_recipe_arguments` as one argv for :func:`resolve_config`."""
    return [item for path in args.config for item in ("--config", path)] + list(args.overrides)


def config_from_args(args) -> RunConfig:
    """The recipe named by ``args.recipe`` with ``args.config`` files and ``args.overrides`` merged on top."""
    return resolve_config(load_recipe(args.recipe)(), recipe_argv(args))
