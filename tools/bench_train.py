"""Benchmark one training step of STEGO and DS²DL against a STEGO-reference-style step, side by side.

A step is what :class:`dist_seg.trainer.Trainer` does per batch: features of the anchors (``online``: the
frozen backbone on uint8 images under ``no_grad``; ``cached``: fp16 features read from the cache, handed
over as fp32), features of the KNN partners when the method uses them, the method's loss (head, loss
terms, cluster and linear probes), backward, the optimiser step and ``after_step``. Batches come from
memory, so this measures the step alone; ``tools/bench_data.py`` measures whether the data layer keeps up.

The cases, measured interleaved (in a new random order every round) in the same process, repeated:

* ``reference``: STEGO's published training step written out here as the baseline: fp32 backbone
  forward of the images and of their KNN partners every step with manual attention (``q @ kᵀ``,
  softmax, ``@ v``: ``fused_attn=False`` in timm, like DINO's ``vision_transformer.py``), a head with a
  dropout draw per branch, the contrastive correlation loss with a Python loop over the negative
  permutations (one einsum each), the probes (the linear one on boolean-masked pixels), and three Adam
  optimisers, as in STEGO's ``train_segmentation.py``;
* ``stego`` / ``ds2dl`` in ``cached`` and ``online`` mode: :mod:`dist_seg.methods` with the trainer's
  step (fused ``scaled_dot_product_attention`` in the backbone).

Backbones are built with **random init (speed only)** from timm's architecture for the named DINO model
(weights are never needed for timing). Before timing, a parity check runs the reference loss and ours on
the same features, weights, coordinates and labels (dropout off, negatives off because the two sample a
negative at different coordinates; the negative term itself is checked against a loop in the loss tests)
and prints the difference.

For each case the tool prints crops/s (median over rounds), the ratio to the reference (median and
minimum of the per-round ratios, so slow phases of a shared machine cancel), and a physical bound:
online, the backbone's matmul FLOPs per crop divided by the best fp32 (or mixed-precision) GEMM rate
measured on the device; cached, the step's matmul FLOPs against the same rate and the feature bytes per
crop against the measured memory copy bandwidth. On CPU it also prints crops per CPU second of this
process, which ignores the time other jobs take the core away; that is meaningful with ``--threads 1``
(waiting OpenMP threads spin and count as CPU time).

``--loader`` times something else: the real training input path. For each method and mode it builds a
:class:`~dist_seg.trainer.Trainer` on a generated toy dataset (toy recipe, ``--workers`` loader workers,
KNN partners read by the workers) and times, interleaved, ``steps`` trainer steps fed by the real loader
(``<method>-<mode>-loader``) and the same steps on one loader batch held in memory
(``<method>-<mode>-memory``: the same conversion to the device and ``train_step``, no waiting). It prints the
ratio loader / memory (median of the per-round ratios), the share of the loader steps' time spent
waiting for a batch (``Trainer``'s own data-wait measure, the one logged as ``perf/data_wait``), and CPU
seconds per step of this process and of the loader's workers: ``workers/step`` is how many cores the input
path needs per core of training step, which decides the ratio on a machine without free cores.

``--before REV`` adds our cases once more with the method and loss modules of git revision ``REV``
(cases ``stego-cached@REV``, ...), so an optimisation is measured before and after in the same run.

Examples::

    python tools/bench_train.py --threads 1 --json bench_train.json                 # CPU, ViT-S/8, 224 px
    python tools/bench_train.py --threads 1 --before 005af61                        # before/after a change
    python tools/bench_train.py --device cuda --batch 32 --mixed-precision bf16     # a GPU machine
    python tools/bench_train.py --profile stego-cached                              # torch.profiler table
    python tools/bench_train.py --loader --workers 2 --threads 1                    # loader vs memory, toy
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_common import machine  # noqa: E402 - puts this checkout on sys.path first
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dist_seg import distributed as D
from dist_seg.backbones import BACKBONES, Backbone, _build_timm, resolve_dtype
from dist_seg.config import RunConfig, StegoConfig
from dist_seg.methods import build_method
from dist_seg.methods.base import Batch, Method, StepContext, sample_coords

RANDOM_INIT = "random init (speed only)"
METHODS = ("stego", "ds2dl")
MODES = ("cached", "online")


def code_version() -> dict:
    """Which ``dist_seg`` is benchmarked: its path, the git commit and whether the work tree differs from it."""
    import dist_seg

    root = Path(__file__).resolve().parent.parent
    out = {"dist_seg": str(Path(dist_seg.__file__).parent)}
    try:
        out["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "dist_seg"],
                                capture_output=True, text=True, check=True).stdout
        out["dist_seg_modified"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5) -> tuple[float, float]:
    """Best observed GEMM rate (FLOP/s) of a square product, the practical compute peak: per wall-clock
    second and per CPU second of this process (the latter only means something on CPU)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    wall = cpu = 0.0
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        sync(device)
        wall = max(wall, 2 * n**3 / (time.perf_counter() - start))
        cpu = max(cpu, 2 * n**3 / max(time.process_time() - start_cpu, 1e-9))
    return wall, cpu


def copy_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Best observed memory bandwidth (bytes/s, read + write) of a 256 MiB tensor copy."""
    src = torch.empty(64 * 2**20, device=device)
    src.fill_(1.0)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * src.numel() * src.element_size() / (time.perf_counter() - start))
    return best


def matmul_flops(fn) -> int:
    """Matmul/convolution FLOPs counted by ``torch.utils.flop_counter`` while ``fn()`` runs."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def methods_at(rev: str) -> dict[str, type[Method]]:
    """The STEGO and DS²DL method classes of git revision ``rev``, computing with that revision's losses.

    Each ``dist_seg/methods/<name>.py`` of ``rev`` is executed as a private module (its imports resolve to
    the working tree), then the loss functions and probe classes it imported are replaced by those of
    ``rev``'s ``dist_seg/losses/<name>.py`` and ``dist_seg/heads/probes.py``. Heads and helpers are the
    working tree's.
    """
    root = Path(__file__).resolve().parent.parent

    def load(path: str) -> types.ModuleType:
        try:
            source = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True,
                                    text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            raise SystemExit(
                f"--before {rev}: cannot read {path} from git ({err}); give a commit of this repository"
            ) from err
        module = types.ModuleType(f"_before_{rev}_{path.replace('/', '_')[:-3]}")
        sys.modules[module.__name__] = module
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
        return module

    classes = {}
    probes = load("dist_seg/heads/probes.py")
    for name in METHODS:
        losses, method = load(f"dist_seg/losses/{name}.py"), load(f"dist_seg/methods/{name}.py")
        for source in (losses, probes):
            for key, value in vars(source).items():
                if callable(value) and getattr(method, key, None) is not None and key in getattr(source, "__all__", ()):
                    setattr(method, key, value)
        classes[name] = next(v for v in vars(method).values()
                             if isinstance(v, type) and issubclass(v, Method) and getattr(v, "name", None) == name)
    return classes


# ------------------------------------------------------------------------------------------ backbones
def random_backbone(name: str, *, fused_attention: bool, device: torch.device) -> Backbone:
    """``name``'s timm architecture with random weights (speed only), wrapped like a loaded backbone.

    ``fused_attention=False`` switches every timm attention block to the manual path
    (``softmax(q kᵀ) v`` with the full attention matrix), as in DINO's reference implementation.
    """
    model = _build_timm(name)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attention
    return Backbone(model, name=name, weights_id=RANDOM_INIT).to(device)


# ------------------------------------------------------------------------------- the reference step
def _ref_norm(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t, dim=1, eps=1e-10)


def _ref_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nchw,ncij->nhwij", a, b)


def _ref_sample(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    # STEGO transposes the coordinate grid before sampling; the loss is a mean, so that is harmless.
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def _ref_helper(f1, f2, c1, c2, shift: float, sc: StegoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        fd = _ref_correlation(_ref_norm(f1), _ref_norm(f2))
        if sc.pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean([3, 4], keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = _ref_correlation(_ref_norm(c1), _ref_norm(c2))
    low = 0.0 if sc.zero_clamp else -9999.0
    clamped = cd.clamp(low, 0.8) if sc.stabilize else cd.clamp(low)
    return -clamped * (fd - shift), cd


class ReferenceStego(nn.Module):
    """STEGO's training step as its public code structures it (the benchmark's baseline).

    Args:
        backbone: a :class:`Backbone` whose attention blocks use the manual path.
        sc: STEGO hyper-parameters (the same ones our method gets).
        num_classes: K.
    """

    def __init__(self, backbone: Backbone, sc: StegoConfig, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.sc = sc
        c, d = backbone.embed_dim, sc.dim
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(sc.dropout)
        self.cluster1 = nn.Conv2d(c, d, 1)
        self.cluster2 = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, d, 1))
        self.clusters = nn.Parameter(torch.randn(num_classes, d))
        self.linear_probe = nn.Conv2d(d, num_classes, 1)
        self.optimizers = [
            torch.optim.Adam(list(self.cluster1.parameters()) + list(self.cluster2.parameters()), lr=sc.lr),
            torch.optim.Adam(self.linear_probe.parameters(), lr=sc.probe_lr),
            torch.optim.Adam([self.clusters], lr=sc.probe_lr),
        ]

    def featurize(self, images: torch.Tensor) -> torch.Tensor:
        """fp32 patch features of uint8 images (the backbone's own forward, under ``no_grad``)."""
        return self.backbone.patch_features(images)

    def code(self, feats: torch.Tensor) -> torch.Tensor:
        return self.cluster1(self.dropout(feats)) + self.cluster2(self.dropout(feats))

    def correlation_loss(self, feats, feats_pos, code, code_pos, coords1, coords2, perms) -> torch.Tensor:
        sc = self.sc
        f1, c1 = _ref_sample(feats, coords1), _ref_sample(code, coords1)
        fp, cp = _ref_sample(feats_pos, coords2), _ref_sample(code_pos, coords2)
        pos_intra, _ = _ref_helper(f1, f1, c1, c1, sc.pos_intra_shift, sc)
        pos_inter, _ = _ref_helper(f1, fp, c1, cp, sc.pos_inter_shift, sc)
        negatives = []
        for perm in perms:
            fn, cn = _ref_sample(feats[perm], coords2), _ref_sample(code[perm], coords2)
            loss, _ = _ref_helper(f1, fn, c1, cn, sc.neg_inter_shift, sc)
            negatives.append(loss)
        loss = sc.pos_intra_weight * pos_intra.mean() + sc.pos_inter_weight * pos_inter.mean()
        if negatives:
            loss = loss + sc.neg_inter_weight * torch.cat(negatives, dim=0).mean()
        return loss

    def probe_losses(self, code: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        detached = code.detach()
        logits = F.interpolate(self.linear_probe(detached), label.shape[-2:], mode="bilinear", align_corners=False)
        logits = logits.permute(0, 2, 3, 1).reshape(-1, self.num_classes)
        flat = label.reshape(-1)
        mask = (flat >= 0) & (flat < self.num_classes)
        linear = F.cross_entropy(logits[mask], flat[mask])
        inner = torch.einsum("bchw,nc->bnhw", _ref_norm(detached), F.normalize(self.clusters, dim=1))
        hard = F.one_hot(inner.argmax(1), self.num_classes).permute(0, 3, 1, 2).to(inner.dtype)
        cluster = -(hard * inner).sum(1).mean()
        return linear + cluster

    def loss(self, feats, feats_pos, label, coords1, coords2, perms) -> torch.Tensor:
        code, code_pos = self.code(feats), self.code(feats_pos)
        loss = self.correlation_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms)
        return loss + self.probe_losses(code, label)

    def step(self, images: torch.Tensor, partner_images: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """One training step on uint8 images and their KNN partners."""
        device = self.clusters.device
        images, partner_images = images.to(device), partner_images.to(device)
        label = label.to(device)
        feats, feats_pos = self.featurize(images), self.featurize(partner_images)
        b, s = feats.shape[0], self.sc.feature_samples
        coords1 = torch.rand(b, s, s, 2, device=device) * 2 - 1
        coords2 = torch.rand(b, s, s, 2, device=device) * 2 - 1
        perms = [D.derangement(b).to(device) for _ in range(self.sc.neg_samples)]
        loss = self.loss(feats, feats_pos, label, coords1, coords2, perms)
        for opt in self.optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        return loss.detach()


# ------------------------------------------------------------------------------------ our step
class OurStep:
    """The trainer's step for one method and mode, on batches held in memory.

    Args:
        method_name: ``stego`` or ``ds2dl``.
        mode: ``cached`` (features in, no backbone) or ``online`` (uint8 images through ``backbone``).
        backbone: the fused-attention backbone (online) and its feature size.
        data: the benchmark batch (``images``, ``partner_images``, ``feats``, ``partner_feats``, ``label``).
        num_classes: K.
        autocast_dtype: mixed precision of the step (None: fp32), as ``train.mixed_precision``.
        cfg: the run config (defaults of every method section).
        method_class: build this class instead of the registered one (``--before``).
    """

    def __init__(self, method_name: str, mode: str, backbone: Backbone, data: dict, *, num_classes: int,
                 autocast_dtype: torch.dtype | None, cfg: RunConfig, method_class: type[Method] | None = None) -> None:
        self.mode = mode
        self.backbone = backbone
        self.device = backbone.mean.device
        self.data = data
        run_cfg = replace(cfg, method=method_name)
        if method_class is None:
            method = build_method(run_cfg, feat_dim=backbone.embed_dim, num_classes=num_classes, has_labels=True)
        else:
            method = method_class(run_cfg, feat_dim=backbone.embed_dim, num_classes=num_classes, has_labels=True)
        self.method = method.to(self.device).train()
        self.optimizer = self.method.build_optimizer()
        self.needs_partners = getattr(self.method, "needs_partners", True)
        self.autocast_dtype = autocast_dtype
        self.step_index = 0

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.backbone.patch_features(images.to(self.device, non_blocking=True)).float()

    def batch(self) -> Batch:
        d = self.data
        if self.mode == "online":
            feats = self._features(d["images"])
            partner = self._features(d["partner_images"]) if self.needs_partners else None
        else:
            feats = d["feats"].to(self.device, non_blocking=True)
            partner = d["partner_feats"].to(self.device, non_blocking=True) if self.needs_partners else None
        return Batch(feats=feats, partner_feats=partner, label=d["label"].to(self.device, non_blocking=True))

    def step(self) -> torch.Tensor:
        batch = self.batch()
        ctx = StepContext(step=self.step_index, seed=0, rank=0, world_size=1, local_batch=batch.feats.shape[0])
        with self._autocast():
            loss, _ = self.method(batch, ctx)
        if not bool(torch.isfinite(loss)):
            raise RuntimeError(f"non-finite loss {float(loss)} in the benchmark step")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.after_step()
        self.step_index += 1
        return loss.detach()


# ------------------------------------------------------------------------------------- parity check
def parity(reference: ReferenceStego, cfg: RunConfig, data: dict, num_classes: int, device: torch.device) -> dict:
    """Reference loss vs ours on identical inputs, weights and coordinates (dropout and negatives off)."""
    sc = replace(cfg.stego, dropout=0.0, neg_samples=0)
    ours = build_method(replace(cfg, method="stego", stego=sc), feat_dim=reference.backbone.embed_dim,
                        num_classes=num_classes, has_labels=True).to(device).train()
    ref = ReferenceStego(reference.backbone, sc, num_classes).to(device).train()  # shares the backbone
    ref.cluster1, ref.cluster2 = copy.deepcopy(ours.head.linear), copy.deepcopy(ours.head.nonlinear)
    ref.clusters = nn.Parameter(ours.cluster_probe.clusters.detach().clone())
    ref.linear_probe = copy.deepcopy(ours.linear_probe.conv)
    feats, partner = data["feats"].to(device), data["partner_feats"].to(device)
    label = data["label"].to(device)
    ctx = StepContext(step=0, seed=0, rank=0, world_size=1, local_batch=feats.shape[0])
    with torch.no_grad():
        mine, _ = ours(Batch(feats=feats, partner_feats=partner, label=label), ctx)
        coords1 = sample_coords(ctx, sc.feature_samples, "coords1", device)
        coords2 = sample_coords(ctx, sc.feature_samples, "coords2", device)
        theirs = ref.loss(feats, partner, label, coords1, coords2, [])
    diff = abs(float(mine) - float(theirs))
    equal = diff <= 1e-4 * max(1.0, abs(float(theirs)))
    return {"ours": float(mine), "reference": float(theirs), "abs_diff": diff, "equal": equal}


# ------------------------------------------------------------------------------------------ timing
@dataclass(kw_only=True)
class Case:
    name: str
    mode: str
    run: object  # () -> loss
    steps: int
    forwards_per_crop: int  # backbone forwards per crop in the step


def make_data(backbone: Backbone, *, batch: int, res: int, num_classes: int, seed: int) -> dict:
    """Random uint8 images and partners, labels with some ignored pixels, and their fp16-rounded features."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=gen)
    partner_images = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=gen)
    label = torch.randint(-1, num_classes, (batch, res, res), generator=gen)
    feats = [backbone.patch_features(x).cpu() for x in (images, partner_images)]
    # The cache stores fp16 [C, h, w] per crop; the loader hands over contiguous fp32 batches.
    feats = [f.half().float().contiguous() for f in feats]
    if backbone.mean.device.type == "cuda":  # as the trainer's loader does on a GPU (make_loader(pin_memory=True))
        images, partner_images, label = images.pin_memory(), partner_images.pin_memory(), label.pin_memory()
        feats = [f.pin_memory() for f in feats]
    return {"images": images, "partner_images": partner_images, "label": label, "feats": feats[0],
            "partner_feats": feats[1]}


def time_case(case: Case, device: torch.device, batch: int) -> tuple[float, float]:
    """crops/s of ``case.steps`` consecutive steps, per wall-clock second and per CPU second of this process.

    On a CPU shared with other jobs the second is the steadier one: time the process is descheduled does
    not count (with ``--threads 1`` it is the rate on a core of one's own, up to cache and memory
    contention).
    """
    sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(case.steps):
        case.run()
    sync(device)
    crops = case.steps * batch
    return crops / (time.perf_counter() - start), crops / max(time.process_time() - start_cpu, 1e-9)


def profile_case(case: Case, device: torch.device, rows: int = 30) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    case.run()
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(case.steps):
            case.run()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"# profile of {case.name} ({case.steps} steps)")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows, max_name_column_width=40,
                                                             max_shapes_column_width=80))


def summarise(samples: dict[str, list[float]], reference: str, before: str | None = None) -> dict:
    """Medians, and per-round ratios to the reference (and to the ``@before`` twin of a case)."""
    out = {}
    for name, values in samples.items():
        entry = {"crops_per_s_median": statistics.median(values), "crops_per_s": values}
        if reference in samples and name != reference:
            ratios = [v / r for v, r in zip(values, samples[reference])]
            entry.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratios=ratios)
        twin = f"{name}@{before}"
        if before and twin in samples:
            speedups = [v / b for v, b in zip(values, samples[twin])]
            entry.update(speedup_vs_before_median=statistics.median(speedups), speedups_vs_before=speedups)
        out[name] = entry
    return out


# ------------------------------------------------------------------------------- --loader: the input path
def children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's live child processes (the loader's workers), from Linux's
    ``/proc``; 0 where there is none."""
    me, ticks = os.getpid(), 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0.0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def loader_bench(args) -> dict:
    """Trainer steps fed by the real loader beside the same steps on a batch held in memory (toy recipes)."""
    from dist_seg.config import merge
    from dist_seg.data.toy import generate_toy
    from dist_seg.features import extract
    from dist_seg.runtime import load_recipe
    from dist_seg.trainer import Trainer

    repo = Path(__file__).resolve().parent.parent
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        generate_toy(tmp / "data", num_train=args.loader_samples, num_val=8,
                     samples_per_shard=max(1, args.loader_samples // (4 * max(1, args.workers))))
        extracted = False
        runners = {}
        for method in args.methods:
            for mode in args.modes:
                cfg = merge(load_recipe(str(repo / "recipes" / f"{method}_toy.py"))(), overrides=[
                    f"data.root={tmp / 'data'}", f"data.feature_cache={tmp / 'cache'}", f"train.mode={mode}",
                    f"train.output_dir={tmp / 'run'}", f"data.batch_size={args.batch}",
                    f"data.num_workers={args.workers}", "tracking.enabled=false", "train.resume=false"])
                if mode == "cached" and not extracted:
                    extract(cfg, splits=["train"])
                    extracted = True
                trainer = Trainer(cfg)
                trainer.method.train()
                held, _ = trainer._loader(cfg.data.train_split, infinite=True, shuffle=True,
                                          partners=trainer.needs_partners)
                first = iter(held)
                raw = next(first)
                del first  # its workers end here
                runners[f"{method}-{mode}"] = (trainer, raw, trainer._batches())
        device = next(iter(runners.values()))[0].device
        memory: dict[str, list[float]] = {name: [] for name in runners}
        loader: dict[str, list[float]] = {name: [] for name in runners}
        waits: dict[str, list[float]] = {name: [] for name in runners}
        # CPU seconds per step: of this process (memory and loader steps) and of the loader's workers.
        cpu: dict[str, dict[str, list[float]]] = {name: {"memory": [], "loader": [], "workers": []} for name in runners}
        order_rng = random.Random(args.seed)
        for round_index in range(args.warmup + args.repeats):
            cases = [(name, kind) for name in runners for kind in ("memory", "loader")]
            order_rng.shuffle(cases)
            for name, kind in cases:
                trainer, raw, batches = runners[name]
                sync(device)
                trainer._data_wait = 0.0
                start, start_cpu, start_children = time.perf_counter(), time.process_time(), children_cpu_seconds()
                for _ in range(args.loader_steps):
                    trainer.train_step(trainer.batch_from(raw) if kind == "memory" else next(batches))
                sync(device)
                elapsed = time.perf_counter() - start
                if round_index < args.warmup:
                    continue
                cpu[name][kind].append((time.process_time() - start_cpu) / args.loader_steps)
                if kind == "loader":
                    cpu[name]["workers"].append((children_cpu_seconds() - start_children) / args.loader_steps)
                rate = args.loader_steps * args.batch / elapsed
                (memory if kind == "memory" else loader)[name].append(rate)
                if kind == "loader":
                    waits[name].append(trainer._data_wait / elapsed)
            if round_index >= args.warmup:
                print(f"# round {round_index - args.warmup + 1}/{args.repeats}: "
                      + ", ".join(f"{n} {loader[n][-1] / memory[n][-1]:.2f}x wait {100 * waits[n][-1]:.0f}%"
                                  for n in runners), flush=True)
        for _, _, batches in runners.values():
            batches.close()  # ends the loader's workers
    print(f"{'':>14} {'--------- wall clock ---------':>48} {'-------- CPU ms per step --------':>34}")
    print(f"{'case':>14} {'memory crops/s':>15} {'loader crops/s':>15} {'x memory':>9} {'x min':>6} {'data wait':>10} "
          f"{'memory':>8} {'loader':>8} {'workers':>8}  workers/step")
    for name in runners:
        ratios = [a / b for a, b in zip(loader[name], memory[name])]
        med = {k: statistics.median(v) for k, v in cpu[name].items()}
        results[name] = {"memory_crops_per_s": memory[name], "loader_crops_per_s": loader[name], "ratios": ratios,
                         "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                         "data_wait": waits[name], "data_wait_median": statistics.median(waits[name]),
                         "cpu_s_per_step": cpu[name], "worker_cpu_per_step_cpu": med["workers"] / med["memory"]}
        r = results[name]
        print(f"{name:>14} {statistics.median(memory[name]):>15.1f} {statistics.median(loader[name]):>15.1f} "
              f"{r['ratio_median']:>9.2f} {r['ratio_min']:>6.2f} {100 * r['data_wait_median']:>9.1f}% "
              f"{1e3 * med['memory']:>8.1f} {1e3 * med['loader']:>8.1f} {1e3 * med['workers']:>8.1f}  "
              f"{r['worker_cpu_per_step_cpu']:.2f}")
    return {"device": str(device), "workers": args.workers, "steps_per_round": args.loader_steps,
            "batch": args.batch, "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="dino_vits8", choices=[b for b in BACKBONES if b != "toy"] + ["toy"])
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8, help="images per step (equal for every case)")
    parser.add_argument("--num-classes", type=int, default=27)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-style step")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (each times every case once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--cached-steps", type=int, default=5, help="steps per timing of a cached case")
    parser.add_argument("--online-steps", type=int, default=1, help="steps per timing of an online case")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                        help="autocast of our steps (the reference is fp32 by definition)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also time our cases with the method/loss modules of git revision REV")
    parser.add_argument("--profile", default=None, metavar="CASE",
                        help="print a torch.profiler table for CASE (e.g. stego-cached, reference) and exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--loader", action="store_true",
                        help="time trainer steps fed by the real loader beside the same steps on a batch in memory "
                             "(toy recipes and data; see the module docstring)")
    parser.add_argument("--workers", type=int, default=2, help="--loader: loader worker processes")
    parser.add_argument("--loader-steps", type=int, default=20, help="--loader: steps per timing")
    parser.add_argument("--loader-samples", type=int, default=256, help="--loader: toy training images written")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    amp = resolve_dtype(args.mixed_precision)
    if amp is not None and device.type != "cuda":
        parser.error("--mixed-precision needs --device cuda (CPU steps run in fp32)")
    if args.loader:
        info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                "machine": machine(device), "code": code_version()}
        print(f"# {info['machine']}")
        print(f"# code: {info['code']}")
        print(f"# --loader: toy recipes, batch {args.batch}, {args.workers} workers, "
              f"{args.loader_steps} steps a timing")
        info["loader"] = loader_bench(args)
        info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        text = json.dumps(info, indent=2)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        return 0
    cfg = RunConfig(num_classes=args.num_classes)
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": machine(device), "backbone": f"{args.backbone} ({RANDOM_INIT})", "res": args.res,
            "batch": args.batch, "mixed_precision": args.mixed_precision, "code": code_version()}
    print(f"# {info['machine']}")
    print(f"# code: {info['code']}")
    print(f"# {info['backbone']} at {args.res} px, batch {args.batch}, ours in {args.mixed_precision}")

    ours_bb = random_backbone(args.backbone, fused_attention=True, device=device)
    ref_bb = random_backbone(args.backbone, fused_attention=False, device=device)
    ref_bb.load_state_dict(ours_bb.state_dict())  # the fp32 weights, before ours stores them in bf16
    # As load_backbone(..., dtype=train.mixed_precision): patch_features runs its own autocast context, so
    # an outer one alone would leave the backbone in fp32; on a GPU this also stores its matmul weights in bf16.
    ours_bb.autocast_dtype = amp
    data = make_data(ours_bb, batch=args.batch, res=args.res, num_classes=args.num_classes, seed=args.seed)

    cases: list[Case] = []
    reference = None
    if not args.no_reference:
        reference = ReferenceStego(ref_bb, cfg.stego, args.num_classes).to(device).train()
        cases.append(Case(name="reference", mode="online", steps=args.online_steps, forwards_per_crop=2,
                          run=lambda: reference.step(data["images"], data["partner_images"], data["label"])))
    steppers = {}
    versions = {"": None}
    if args.before:
        versions[f"@{args.before}"] = methods_at(args.before)
    for suffix, classes in versions.items():
        for method_name in args.methods:
            for mode in args.modes:
                stepper = OurStep(method_name, mode, ours_bb, data, num_classes=args.num_classes, autocast_dtype=amp,
                                  cfg=cfg, method_class=None if classes is None else classes[method_name])
                name = f"{method_name}-{mode}{suffix}"
                steppers[name] = stepper
                forwards = (1 + stepper.needs_partners) if mode == "online" else 0
                cases.append(Case(name=name, mode=mode, run=stepper.step, forwards_per_crop=forwards,
                                  steps=args.cached_steps if mode == "cached" else args.online_steps))

    if args.profile:
        chosen = [c for c in cases if c.name == args.profile]
        if not chosen:
            parser.error(f"--profile must be one of {[c.name for c in cases]}")
        profile_case(chosen[0], device)
        return 0

    if reference is not None:
        info["parity"] = parity(reference, cfg, data, args.num_classes, device)
        print(f"# parity (dropout and negatives off): {info['parity']}")

    # Physical bounds: matmul FLOPs per crop (flop_counter) against the best GEMM rate seen on the device.
    rate_dtype = amp or torch.float32
    rate, cpu_rate = gemm_rate(device, rate_dtype)
    bandwidth = copy_bandwidth(device)
    one = data["images"][:1]
    backbone_flops = matmul_flops(lambda: ref_bb.patch_features(one.to(device)))
    step_flops = {}
    for name, stepper in steppers.items():
        if stepper.mode == "cached":
            step_flops[name] = matmul_flops(stepper.step) / args.batch
    feat_bytes = ours_bb.embed_dim * (args.res // ours_bb.patch_size) ** 2 * 2  # fp16 in the cache

    samples: dict[str, list[float]] = {c.name: [] for c in cases}
    cpu_samples: dict[str, list[float]] = {c.name: [] for c in cases}
    order_rng = random.Random(args.seed)
    for round_index in range(args.warmup + args.repeats):
        order = list(cases)
        order_rng.shuffle(order)  # a new order every round: no case always runs first or after another
        for case in order:
            wall, cpu = time_case(case, device, args.batch)
            if round_index >= args.warmup:
                samples[case.name].append(wall)
                cpu_samples[case.name].append(cpu)
        if round_index >= args.warmup:
            print(f"# round {round_index - args.warmup + 1}/{args.repeats}: "
                  + ", ".join(f"{k} {v[-1]:.3g}" for k, v in samples.items()), flush=True)
    again = gemm_rate(device, rate_dtype)  # the machine may be shared: keep the best rates seen
    rate, cpu_rate = max(rate, again[0]), max(cpu_rate, again[1])
    results = summarise(samples, "reference", args.before)
    with_cpu = device.type == "cpu"
    if with_cpu:
        for name, entry in summarise(cpu_samples, "reference", args.before).items():
            results[name]["cpu_time"] = entry

    width = max(14, *(len(c.name) for c in cases))
    print(f"{'':>{width}} {'---------- wall clock ----------':>42} {'--- CPU time of this process ---':>34}")
    print(f"{'case':>{width}} {'crops/s':>9} {'x ref':>7} {'x ref min':>9} {'x before':>8} {'% bound':>7} "
          f"{'crops/s':>9} {'x ref':>7} {'x before':>8} {'% bound':>7}  bound from")
    for case in cases:
        entry = results[case.name]
        if case.mode == "online":
            flops = case.forwards_per_crop * backbone_flops
            bound, cpu_bound = rate / flops, cpu_rate / flops
            why = f"{flops / 1e9:.1f} GFLOP backbone/crop ({bound:.3g}/s)"
        else:
            flops = step_flops[case.name]
            moved = feat_bytes * (1 + steppers[case.name].needs_partners)
            compute, memory = rate / flops, bandwidth / moved
            bound, cpu_bound = min(compute, memory), min(cpu_rate / flops, memory)
            why = (f"{flops / 1e9:.2f} GFLOP step/crop ({compute:.3g}/s), "
                   f"{moved / 2**20:.2f} MiB features/crop ({memory:.3g}/s)")
        entry.update(bound_crops_per_s=bound, bound_note=why, fraction_of_bound=entry["crops_per_s_median"] / bound,
                     matmul_flops_per_crop=flops)
        nan = float("nan")
        cells = [entry["crops_per_s_median"], entry.get("ratio_median", nan), entry.get("ratio_min", nan),
                 entry.get("speedup_vs_before_median", nan), 100 * entry["fraction_of_bound"]]
        cpu = entry.get("cpu_time", {})
        if cpu:
            cpu.update(bound_crops_per_s=cpu_bound, fraction_of_bound=cpu["crops_per_s_median"] / cpu_bound)
        cells += [cpu.get("crops_per_s_median", nan), cpu.get("ratio_median", nan),
                  cpu.get("speedup_vs_before_median", nan), 100 * cpu.get("fraction_of_bound", nan)]
        print(f"{case.name:>{width}} {cells[0]:>9.3g} {cells[1]:>7.2f} {cells[2]:>9.2f} {cells[3]:>8.2f} "
              f"{cells[4]:>6.1f}% {cells[5]:>9.3g} {cells[6]:>7.2f} {cells[7]:>8.2f} {cells[8]:>6.1f}%  {why}")
    info.update(gemm_flops=rate, gemm_flops_per_cpu_s=cpu_rate if with_cpu else None, gemm_dtype=str(rate_dtype),
                copy_bandwidth_bytes=bandwidth,
                backbone_matmul_flops_per_forward=backbone_flops, feature_bytes_per_crop_fp16=feat_bytes,
                results=results, load_avg_after=[round(x, 2) for x in os.getloadavg()])
    print(f"# GEMM {rate / 1e9:.0f} GFLOP/s ({rate_dtype}), copy {bandwidth / 1e9:.1f} GB/s, "
          f"backbone {backbone_flops / 1e9:.1f} GFLOP/forward; load {info['load_avg_after']}")
    text = json.dumps(info, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
