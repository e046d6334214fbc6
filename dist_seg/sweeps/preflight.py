"""Checks a sweep makes before it schedules anything: the data exists, and one trial fits a node.

Without them, a sweep whose dataset is missing builds Ray actors and waits for resources before its first
trial fails, and a sweep asking for ``{'GPU': 1}`` on a cluster without GPUs waits forever.
"""

from __future__ import annotations

import logging

from dist_seg.config import RunConfig
from dist_seg.sweeps.spec import SweepError, SweepSpec

log = logging.getLogger("dist_seg.tune")

# Searched keys that choose another dataset per trial: then each trial checks its own data.
DATA_KEYS = ("data.root", "data.dataset", "data.train_split", "data.val_split", "data.feature_cache",
             "train.mode", "backbone.name", "data.res")


def check_sweep_data(spec: SweepSpec, base: RunConfig) -> None:
    """Raise the trainer's own data error now when the sweep's recipe names a dataset that does not exist.

    Raises:
        ConfigError: no dataset at ``data.root`` (naming the ``dist-seg prepare`` command), no such split,
            or a missing feature cache; the same message a training run would give.
    """
    if any(name in DATA_KEYS for name in spec.params):
        return
    from dist_seg.features import read_data_info

    read_data_info(base)


def trial_demand(spec: SweepSpec) -> dict[str, float]:
    """What one trial process (one worker of a multi-worker trial) asks Ray for."""
    need = {"CPU": float(spec.resources.cpu)}
    if spec.resources.gpu:
        need["GPU"] = float(spec.resources.gpu)
    return need


def check_trial_fits(spec: SweepSpec, *, can_grow: bool) -> None:
    """Stop when no node of the Ray cluster can ever hold one trial (or one of its workers).

    Args:
        spec: the sweep.
        can_grow: the cluster was not started here (``--address``, ``ray job submit``, or Ray initialised by
            the caller), so an autoscaler may still add nodes: warn instead of stopping.

    Raises:
        SweepError: naming the resource that is short and the two ways out.
    """
    import ray

    need = trial_demand(spec)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
    fits_node = any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for n in nodes)
    fits_all = all(total[k] + 1e-9 >= v * spec.trial_workers for k, v in need.items())
    if fits_node and fits_all:
        return
    best = max(nodes, key=lambda n: sum(n.get(k, 0.0) >= v for k, v in need.items()), default={})
    have = {k: best.get(k, 0.0) for k in need}
    what = "one trial" if spec.trial_workers == 1 else f"each of a trial's {spec.trial_workers} workers"
    short = sorted(k for k, v in need.items()
                   if best.get(k, 0.0) + 1e-9 < v or total[k] + 1e-9 < v * spec.trial_workers)
    fixes = []
    if "GPU" in short:
        fixes.append("`resources.gpu=0` on the command line (train on CPUs)")
    if "CPU" in short:
        fixes.append(f"`resources.cpu={max(1, int(have.get('CPU', 1)))}`")
    if spec.trial_workers > 1:
        fixes.append("a smaller `trial_workers=`")
    size = "`--num-gpus N` / `--num-cpus N` if this machine has them" if not can_grow else "more nodes"
    message = (f"{what} needs {need} but no node of the Ray cluster can hold it (largest node: {have}; "
               f"cluster total: {total}): its trials would wait forever. Use {' or '.join(fixes)}, "
               f"or give the cluster {size}")
    if can_grow:
        log.warning("%s (waiting, in case the cluster adds nodes)", message)
        return
    raise SweepError(message)
