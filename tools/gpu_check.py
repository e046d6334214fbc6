"""The GPU-only paths of dist_seg in one run, with one JSON of figures (started by tools/gpu_check.sh).

Items, each timed and reported on its own (a failing item is recorded and the others still run). Every
throughput figure excludes set-up: a warm-up runs first and only the timed repetitions count.

* ``environment``: torch, its CUDA build, the driver's CUDA version, the GPU and its compute capability, the
  installed versions of the distributions the paths below use, and the KNN backend ``auto`` picks and why;
* ``matmul-bf16``: the measured bf16 matrix-product rate (8192^3, FLOP/s): the ceiling of the tables in
  docs/benchmarks.md ("what bounds one H200");
* ``encode``: images/s of the frozen ViT-S/8 and ViT-B/8 forwards at 224 px in bf16 autocast (random init),
  and the dtype and GiB of the weights the backbone holds on the GPU (bf16 linear/conv weights);
* ``decode``: JPEG decode + resize to 224 images/s on one CPU core (PIL, as the loader workers do), and
  torchvision's batched ``decode_jpeg`` on the GPU;
* ``attention``: the backbone's fused attention under bf16 with each SDPA kernel forced (flash,
  memory-efficient, math) against an fp32 math reference (a second backbone with fp32 weights): relative
  error and ms per forward;
* ``train-stego-online``, ``train-stego-cached``, ``train-ds2dl-online``, ``train-ds2dl-cached``: the real
  trainer (``dist_seg.trainer.train``, bf16) on generated data; set-up (backbone, KNN mining, extraction,
  final validation, checkpoint) is reported apart from the steady-state crops/s of the timed steps (taken
  from optimiser-step timestamps after ``WARMUP_STEPS``), and the host synchronisations per timed step
  (``torch.cuda.set_sync_debug_mode("warn")`` on during the timed steps only, warnings counted);
* ``host-syncs``: the per-step host synchronisation counts of the four runs above, side by side;
* ``bench-train-in-memory``: ``tools/bench_train.py``'s step timing on batches already in memory (no
  loader, no partner fetch, no collectives: an upper bound of the trainer, not its throughput);
* ``knn-torch``: the exact torch search on the cross-rank path (``distributed_knn``'s non-symmetric
  ``_torch_candidates``) for one rank's share of an 8-rank table: 590k/8 queries against 590k keys of 768;
* ``knn-faiss-gpu``: whether ``backend=auto`` uses faiss-gpu here and why (installed distributions, GPU API,
  declared compute capability); where it does, faiss-gpu against torch (same indices expected);
* ``collectives``: ``dist_seg.distributed`` and ``distributed_knn`` on 2 processes: NCCL where the machine
  has 2 GPUs; with one GPU NCCL cannot put two ranks on it, so gloo on CUDA tensors (said in the JSON);
  gloo on CPU in the dry run. Results are compared with one-process references; all-reduce bandwidth;
* ``deepspeed-zero2``: the trainer under DeepSpeed ZeRO-2 in bf16 (one process: partitioning is trivial),
  with its final validation, checkpointing, then a second run resuming from DeepSpeed's shards.

``--dry-run`` runs the same code on the CPU at tiny sizes (toy backbone, fp32, gloo) and reports every
GPU-only item as ``"skipped: no GPU"`` with what the CPU run did under ``"dry_run"``: CI runs it
(tests/test_gpu_check.py), so the script cannot rot unnoticed; its collectives and DeepSpeed items run for
real on 2 gloo processes and on one CPU process.

The JSON has the shape of the benchmark tools' (``date``, ``command``, ``machine``, ``code``, ``results``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
NO_GPU = "skipped: no GPU"
# Distribution names as installed (faiss-gpu-cu12 is what the `gpu` extra installs; the others are found too).
PACKAGES = ("torch", "torchvision", "timm", "accelerate", "deepspeed", "faiss-cpu", "faiss-gpu-cu12", "faiss-gpu",
            "webdataset", "wids", "omegaconf", "pydantic", "numpy", "pillow", "pycocotools", "pydensecrf2", "dist_seg")
WARMUP_STEPS = 10


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Check:
    """Sizes and switches of one run: the GPU run, or the CPU dry run at tiny sizes."""

    def __init__(self, dry: bool, work: Path) -> None:
        self.dry = dry
        self.gpu = torch.cuda.is_available() and not dry
        self.device = torch.device("cuda" if self.gpu else "cpu")
        self.work = work
        self.precision = "bf16" if self.gpu else "no"
        self.size = 224 if self.gpu else 32
        self.batch = 32 if self.gpu else 4
        self.num_train = 256 if self.gpu else 16
        self.num_val = 32 if self.gpu else 4
        self.steps = 40 if self.gpu else 4
        self.warmup = WARMUP_STEPS if self.gpu else 1
        self.syncs: dict[str, Optional[float]] = {}
        self.backbone = "dino_vits8" if self.gpu else "toy"
        self._weights = None
        self._data = None

    def status(self, ok: bool = True) -> str:
        """A GPU-only item's status: its outcome on a GPU, ``skipped: no GPU`` in the dry run."""
        return ("ok" if ok else "failed") if self.gpu else NO_GPU

    def backbone_weights(self):
        """A random-init ViT-S/8 saved as a timm state dict (no download: weights do not matter for speed)."""
        if self.backbone == "toy":
            return None
        if self._weights is None:
            import timm

            from dist_seg.backbones import BACKBONES

            torch.manual_seed(0)
            model = timm.create_model(BACKBONES[self.backbone].timm_name, pretrained=False, num_classes=0)
            self._weights = self.work / "vits8_random_init.pth"
            torch.save(model.state_dict(), self._weights)
        return self._weights

    def data(self) -> Path:
        if self._data is None:
            from dist_seg.data.toy import generate_toy

            self._data = self.work / "toy"
            generate_toy(self._data, num_train=self.num_train, num_val=self.num_val, size=self.size,
                         samples_per_shard=max(4, self.num_train // 8))
        return self._data

    def overrides(self, method: str, mode: str, out: Path, *extra: str) -> list[str]:
        weights = self.backbone_weights()
        return [f"data.root={self.data()}", f"train.output_dir={out}", f"data.batch_size={self.batch}",
                f"data.res={self.size}", f"data.eval_res={self.size}", "data.num_workers=2", "data.shuffle_buffer=16",
                f"backbone.name={self.backbone}", *([f"backbone.weights={weights}"] if weights else []),
                f"train.mode={mode}", f"train.mixed_precision='{self.precision}'", f"train.num_steps={self.steps}",
                "train.val_every=0", f"train.checkpoint_every={self.steps}", "train.log_every=10",
                "tracking.enabled=false", "eval.num_overlays=0", *(["stego.feature_samples=5"] if method == "stego"
                                                                   else []), *extra]


# ------------------------------------------------------------------------------------------ items
def environment(check: Check) -> dict:
    import importlib.metadata as md

    from dist_seg.knn import choose_backend, faiss_environment
    from dist_seg.runtime import cuda_facts, cuda_problem, driver_release

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    facts = cuda_facts()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    faiss_env = faiss_environment(device)
    out = {"status": "ok", "python": sys.version.split()[0], "packages": versions,
           "faiss_distributions": dict(faiss_env.distributions),
           "cuda_available": facts.available, "torch_cuda_build": facts.cuda_build,
           "driver": driver_release(),
           "driver_cuda": None if facts.driver_cuda is None else "{}.{}".format(*facts.driver_cuda),
           "cuda_problem": cuda_problem(facts), "compiled_archs": torch.cuda.get_arch_list(),
           "knn_auto_backend": dict(zip(("backend", "why"), choose_backend("auto", device.type, faiss_env)))}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
    return out


def _timed(fn, *, warmup: int, repeats: int) -> float:
    """Seconds per call of ``fn`` over ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeats


def matmul_bf16(check: Check) -> dict:
    """The measured bf16 (fp32 in the dry run) matrix-product rate: the GPU ceiling of docs/benchmarks.md."""
    n = 8192 if check.gpu else 256
    dtype = torch.bfloat16 if check.gpu else torch.float32
    gen = torch.Generator(device=check.device).manual_seed(0)
    a = torch.randn(n, n, device=check.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=check.device, dtype=dtype, generator=gen)
    seconds = _timed(lambda: a @ b, warmup=3, repeats=10 if check.gpu else 2)
    rate = 2 * n**3 / seconds
    return {"status": check.status(rate > 0), "dry_run" if check.dry else "figures": {
        "n": n, "dtype": str(dtype), "seconds_per_product": seconds, "tflop_per_s": rate / 1e12,
        "note": "random data, mean of the timed products after 3 warm-ups"}}


def weight_memory(backbone) -> dict:
    """What the backbone's parameters hold where it runs: dtypes and GiB (bf16 matmul weights on a GPU)."""
    from dist_seg.backbones import matmul_parameters

    params = list(backbone.parameters())
    return {"matmul_weights_dtype": sorted({str(p.dtype) for p in matmul_parameters(backbone.model)}),
            "weights_gib": sum(p.numel() * p.element_size() for p in params) / 2**30,
            "weights_fp32_gib": sum(p.numel() * 4 for p in params) / 2**30}


def encode(check: Check) -> dict:
    """Frozen-backbone forwards: images/s at 224 px in bf16 autocast (ViT-S/8, ViT-B/8, random init)."""
    import timm

    from dist_seg.backbones import BACKBONES, load_backbone

    names = ("dino_vits8", "dino_vitb8") if check.gpu else ("toy",)
    figures = {}
    for name in names:
        weights = None
        if name != "toy":
            torch.manual_seed(0)
            model = timm.create_model(BACKBONES[name].timm_name, pretrained=False, num_classes=0)
            weights = check.work / f"{name}_random_init.pth"
            torch.save(model.state_dict(), weights)
            del model
        backbone = load_backbone(name, weights, dtype=check.precision).to(check.device).eval()
        batch = 64 if check.gpu else 2
        images = torch.rand(batch, 3, check.size, check.size, device=check.device)
        with torch.no_grad():
            seconds = _timed(lambda fn=backbone.patch_features, x=images: fn(x), warmup=3,
                             repeats=10 if check.gpu else 2)
        figures[name] = {"batch": batch, "res": check.size, "images_per_s": batch / seconds,
                         "ms_per_batch": 1e3 * seconds, "dtype": "bf16 autocast" if check.gpu else "fp32",
                         **weight_memory(backbone)}
        del backbone
    # On the GPU the bf16 backbone must hold bf16 matmul weights (half the fp32 memory); the CPU holds fp32.
    held = ["torch.bfloat16"] if check.gpu else ["torch.float32"]
    return {"status": check.status(all(f["images_per_s"] > 0 and f["matmul_weights_dtype"] == held
                                       for f in figures.values())),
            "dry_run" if check.dry else "figures": figures}


def decode(check: Check) -> dict:
    """JPEG decode + resize to the training resolution: one CPU core (PIL), and batched on the GPU."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    # A smooth 640x480 photo-like image (noise would compress badly and decode slower than photos).
    ramp = np.linspace(0, 255, 640, dtype=np.float32)
    base = (ramp[None, :, None] * 0.6 + rng.normal(0, 12, (480, 640, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()

    def cpu_one():
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").resize((check.size, check.size), Image.BILINEAR)

    repeats = 200 if check.gpu else 10
    cpu_s = _timed(cpu_one, warmup=5, repeats=repeats)
    figures = {"jpeg_bytes": len(data), "source_size": "640x480", "res": check.size,
               "cpu_images_per_s_per_core": 1 / cpu_s, "cores": os.cpu_count(),
               "cpu_images_per_s_all_cores_estimate": os.cpu_count() / cpu_s}
    if check.gpu:
        import torch.nn.functional as F
        from torchvision.io import decode_jpeg

        batch = [torch.frombuffer(bytearray(data), dtype=torch.uint8)] * 64

        def gpu_batch():
            out = decode_jpeg(batch, device=check.device)
            F.interpolate(torch.stack(out).float(), size=(check.size, check.size), mode="bilinear")

        gpu_s = _timed(gpu_batch, warmup=3, repeats=20)
        figures["gpu_images_per_s"] = 64 / gpu_s
    return {"status": check.status(True), "dry_run" if check.dry else "figures": figures}


class StepClock:
    """Timestamps of the optimiser steps of one run (a global torch optimiser hook: the trainer is not
    touched), with the host-synchronisation warnings counted over the timed steps only."""

    def __init__(self, warmup: int, steps: int, count_syncs: bool) -> None:
        self.warmup, self.steps, self.count_syncs = warmup, steps, count_syncs
        self.times: list[float] = []
        self.owner = None
        self.caught: list = []
        self.window = [None, None]  # indices into caught when the timed steps began/ended

    def hook(self, optimizer, args, kwargs) -> None:
        if self.owner is None:
            self.owner = id(optimizer)
        if id(optimizer) != self.owner:
            return
        self.times.append(time.perf_counter())
        done = len(self.times)
        if done == self.warmup:
            _sync()
            self.times[-1] = time.perf_counter()
            if self.count_syncs:
                self.window[0] = len(self.caught)
                torch.cuda.set_sync_debug_mode("warn")
        elif done == self.steps:
            if self.count_syncs:
                torch.cuda.set_sync_debug_mode(0)
                self.window[1] = len(self.caught)
            _sync()
            self.times[-1] = time.perf_counter()

    def figures(self, batch: int) -> dict:
        timed = len(self.times) - self.warmup
        if timed <= 0:
            return {"steady_crops_per_s": None, "timed_steps": 0}
        seconds = self.times[self.warmup - 1 + timed] - self.times[self.warmup - 1]
        out = {"timed_steps": timed, "warmup_steps": self.warmup, "steady_s_per_step": seconds / timed,
               "steady_crops_per_s": timed * batch / seconds}
        if self.count_syncs and None not in self.window:
            syncs = [w for w in self.caught[self.window[0]:self.window[1]] if "synchroniz" in str(w.message)]
            out["host_syncs_per_step"] = len(syncs) / timed
            out["host_sync_sites"] = sorted({str(w.message).splitlines()[0][:120] for w in syncs})[:5]
        return out


def train_item(check: Check, method: str, mode: str) -> dict:
    from dist_seg.checkpoints import load_checkpoint
    from dist_seg.config import merge
    from dist_seg.trainer import load_recipe, train

    out = check.work / f"run-{method}-{mode}"
    cfg = merge(load_recipe(str(REPO / "recipes" / f"{method}_toy.py"))(), overrides=check.overrides(method, mode, out))
    t_extract = 0.0
    if mode == "cached":
        from dist_seg.features import extract

        t0 = time.perf_counter()
        extract(cfg)
        t_extract = time.perf_counter() - t0
    if check.gpu:
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(check.warmup, check.steps, count_syncs=check.gpu)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(clock.hook)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            clock.caught = caught
            result = train(cfg)
    finally:
        handle.remove()
        if check.gpu:
            torch.cuda.set_sync_debug_mode(0)
    wall = time.perf_counter() - t0
    steady = clock.figures(check.batch)
    check.syncs[f"{method}-{mode}"] = steady.get("host_syncs_per_step")
    ckpt = out / "checkpoints" / f"step-{check.steps:08d}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    load_checkpoint(ckpt)
    metrics = result.get("metrics", {})
    ok = result["step"] == check.steps and state["step"] == check.steps and steady["timed_steps"] > 0
    timed_s = steady.get("steady_s_per_step", 0) * steady["timed_steps"]
    return {"status": check.status(ok), "dry_run" if check.dry else "figures": {
        "steps": result["step"], "batch": check.batch, "res": check.size, "backbone": check.backbone,
        "mixed_precision": check.precision, "train_wall_s": wall, "extract_wall_s": t_extract,
        "setup_and_teardown_s": wall - timed_s, **steady,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if check.gpu else None,
        "checkpoint_weights_only": True, "val": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}}


def host_syncs(check: Check) -> dict:
    """The host synchronisations per timed training step of the train-* items (run them first)."""
    counted = {k: v for k, v in check.syncs.items()}
    if not check.gpu:
        return {"status": NO_GPU, "dry_run": {"runs": sorted(counted), "note": "CPU ops never synchronise"}}
    if not counted:
        return {"status": "failed: no train-* item ran before this one"}
    return {"status": "ok" if all(v is not None for v in counted.values()) else "failed: not counted",
            "figures": {"per_step": counted, "how": "torch.cuda.set_sync_debug_mode('warn') during the timed "
                                                   f"steps (after {check.warmup} warm-up steps), warnings counted; "
                                                   "logging steps (train.log_every=10) included"}}


def attention(check: Check) -> dict:
    """Patch features with each SDPA kernel forced, against fp32 math attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dist_seg.backbones import load_backbone

    torch.manual_seed(0)
    images = torch.rand(8 if check.gpu else 2, 3, check.size, check.size, device=check.device)
    with torch.no_grad():
        # fp32 math reference from its own fp32 backbone: on a GPU the bf16 one stores bf16 weights.
        reference = load_backbone(check.backbone, check.backbone_weights(), dtype="fp32").to(check.device)
        with sdpa_kernel([SDPBackend.MATH]):
            ref = reference.patch_features(images).float()
        del reference
        backbone = load_backbone(check.backbone, check.backbone_weights(), dtype=check.precision).to(check.device)
        kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "math": SDPBackend.MATH}
        results = {}
        for name, kernel in kernels.items():
            if not check.gpu and name != "math":
                results[name] = {"status": NO_GPU}
                continue
            try:
                with sdpa_kernel([kernel]):
                    out = backbone.patch_features(images).float()
                    repeats = 10 if check.gpu else 1
                    _sync()
                    t0 = time.perf_counter()
                    for _ in range(repeats):
                        backbone.patch_features(images)
                    _sync()
                ms = 1e3 * (time.perf_counter() - t0) / repeats
                rel = float((out - ref).norm() / ref.norm())
                results[name] = {"status": "ok" if math.isfinite(rel) and rel < 3e-2 else f"failed: rel error {rel}",
                                 "rel_error_vs_fp32_math": rel, "ms_per_forward": ms,
                                 "images_per_s": images.shape[0] / ms * 1e3}
            except RuntimeError as err:  # the kernel does not serve these shapes/dtype on this GPU
                results[name] = {"status": f"failed: {str(err).splitlines()[0][:200]}"}
    fused = {k: v for k, v in results.items() if k in ("flash", "efficient")}
    ok = all(v["status"] == "ok" for v in fused.values())
    return {"status": check.status(ok), "backbone": f"{check.backbone} (random init)", "batch": images.shape[0],
            "res": check.size, "dtype": "bf16 autocast" if check.gpu else "fp32", "kernels": results}


def bench_train(check: Check) -> dict:
    tool = _tool("bench_train")
    out = check.work / "bench_train.json"
    if not check.gpu:
        # tests/test_bench_tools.py runs the tool itself on CPU; the dry run only checks it loads here.
        return {"status": NO_GPU, "dry_run": {"tool_loaded": callable(tool.main)}}
    argv = ["--device", "cuda", "--batch", "32", "--mixed-precision", "bf16", "--repeats", "3", "--warmup", "1",
            "--cached-steps", "5", "--online-steps", "2"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # its JSON goes into ours; keep the table for the log
        code = tool.main([*argv, "--json", str(out)])
    print("\n".join(ln for ln in printed.getvalue().splitlines() if not ln.startswith((" ", "{", "}"))))
    info = json.loads(out.read_text())
    table = {name: {"crops_per_s_median": entry["crops_per_s_median"], "ratio_median": entry.get("ratio_median"),
                    "fraction_of_bound": entry.get("fraction_of_bound")} for name, entry in info["results"].items()}
    return {"status": check.status(code == 0), "figures": table, "bench_train": info}


def _knn_sizes(check: Check) -> tuple[int, int, int, int]:
    """(keys, queries, dim, k): one rank's share of an 8-rank COCO table (590k crops, ViT-B 768) on a GPU."""
    return (590_000, 590_000 // 8, 768, 30) if check.gpu else (2_048, 256, 64, 5)


def knn_torch(check: Check) -> dict:
    """The cross-rank path of distributed_knn: this rank's queries against every key (non-symmetric search)."""
    from dist_seg.knn import knn

    n, nq, d, k = _knn_sizes(check)
    gen = torch.Generator(device=check.device).manual_seed(0)
    keys = torch.randn(n, d, device=check.device, generator=gen)
    offset = n // 2  # a middle rank's slice
    queries = keys[offset: offset + nq]
    knn(queries[:512], keys[:8192], k, exclude_self=True, backend="torch", query_offset=0)  # warm-up (cuBLAS)
    _sync()
    t0 = time.perf_counter()
    sims, index, stats = knn(queries, keys, k, exclude_self=True, backend="torch", query_offset=offset,
                             return_stats=True)
    _sync()
    seconds = time.perf_counter() - t0
    figures = {"keys": n, "queries": nq, "dim": d, "k": k, "seconds": seconds, "queries_per_s": nq / seconds,
               "symmetric": stats["symmetric"], "brute_force_rows": stats["brute_force_rows"],
               "full_table_estimate_s_on_8_ranks": seconds,
               "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if check.gpu else None}
    ok = not stats["symmetric"] and bool((index != torch.arange(nq, device=index.device)[:, None] + offset).all())
    return {"status": check.status(ok), "dry_run" if check.dry else "figures": figures}


def knn_faiss_gpu(check: Check) -> dict:
    """Whether backend=auto takes faiss-gpu here and why; where it does, faiss-gpu against torch."""
    from dist_seg.knn import choose_backend, faiss_environment, knn

    env = faiss_environment(check.device)
    backend, why = choose_backend("auto", check.device.type, env)
    decision = {"auto_backend": backend, "why": why, "faiss_distributions": dict(env.distributions),
                "gpu_api": env.gpu_api, "declared_capability": {k: v for k, v in env.declared.items()},
                "device_capability": env.capability}
    if not check.gpu:
        return {"status": NO_GPU, "dry_run": decision}
    if backend != "faiss-gpu":
        return {"status": f"skipped: faiss-gpu not used: {why}", "figures": decision}
    n, nq, d, k = _knn_sizes(check)
    n, nq = min(n, 200_000), min(nq, 20_000)
    gen = torch.Generator(device=check.device).manual_seed(0)
    keys = torch.randn(n, d, device=check.device, generator=gen)
    results = {}
    for name in ("torch", "faiss-gpu"):
        knn(keys[:512], keys[:4096], k, exclude_self=True, backend=name)  # warm-up
        _sync()
        t0 = time.perf_counter()
        results[name] = knn(keys[:nq], keys, k, exclude_self=True, backend=name)
        _sync()
        decision[f"{name}_s"] = time.perf_counter() - t0
    same = float((results["torch"][1] == results["faiss-gpu"][1]).float().mean())
    decision.update(keys=n, queries=nq, dim=d, k=k, same_indices_fraction=same)
    return {"status": "ok" if same == 1.0 else f"failed: {1 - same:.2%} of the indices differ", "figures": decision}


def deepspeed_zero2(check: Check) -> dict:
    from dist_seg.config import merge
    from dist_seg.trainer import load_recipe, train

    out = check.work / "run-deepspeed"
    ds = str(REPO / "launch" / "deepspeed_zero2.json")
    base = load_recipe(str(REPO / "recipes" / "stego_toy.py"))()
    half = max(1, check.steps // 2)
    # bf16 in the dry run too (DeepSpeed's bf16 runs on the CPU): the path whose validation and checkpoints
    # must see the fp32 master weights.
    settings = (f"train.deepspeed_config={ds}", "train.mixed_precision=bf16", f"train.checkpoint_every={half}")
    first = merge(base, overrides=check.overrides("stego", "online", out, *settings, f"train.num_steps={half}"))
    if check.dry:  # the items before trained in fp32 in this process; Accelerate keeps one precision per process
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    t0 = time.perf_counter()
    first_result = train(first)  # ends with the final validation (the path that crashed under bf16 weights)
    first_s = time.perf_counter() - t0
    val = {k: v for k, v in first_result.get("metrics", {}).items() if isinstance(v, (int, float))}
    shards = sorted(p.name for p in (out / "checkpoints" / "deepspeed" / f"step-{half:08d}").iterdir())
    # The resumed run is a fresh `dist-seg train` process, as after a preemption (DeepSpeed's process groups
    # also cannot be rebuilt inside one process). It reads DeepSpeed's shards through the weights-only loader.
    cmd = [sys.executable, "-m", "dist_seg.cli", "train", str(REPO / "recipes" / "stego_toy.py"),
           *check.overrides("stego", "online", out, *settings, f"train.num_steps={2 * half}")]
    t0 = time.perf_counter()
    # Without the rendezvous variables this process exported for its own one-rank group (its port is taken).
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    resume_s = time.perf_counter() - t0
    if res.returncode != 0:
        return {"status": f"failed: the resumed run exited {res.returncode}: {res.stderr[-600:]}"}
    from dist_seg.checkpoints import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / f"step-{2 * half:08d}.pt")
    dtypes = sorted({str(v.dtype) for v in state["method"].values() if torch.is_tensor(v) and v.is_floating_point()})
    ok = (state["step"] == 2 * half and any("optim_states" in s for s in shards) and "resumed from" in res.stderr
          and bool(val) and dtypes == ["torch.float32"])
    return {"status": check.status(ok), "dry_run" if check.dry else "figures": {
        "ranks": 1, "note": "one process: ZeRO-2 partitioning is trivial; the multi-rank path is tested on CPU "
                            "(tests/test_deepspeed_engine.py)", "validation": val,
        "first_run_steps": half, "first_run_s": first_s, "resumed_to": state["step"], "resumed_run_s": resume_s,
        "resumed_log": next((ln for ln in res.stderr.splitlines() if "resumed from" in ln), None),
        "shards": shards, "mixed_precision": "bf16", "checkpoint_dtypes": dtypes}}


def collectives(check: Check) -> dict:
    """dist_seg.distributed and distributed_knn on 2 processes, against one-process references.

    NCCL needs one GPU per rank: with 2+ GPUs the ranks use NCCL on GPUs 0 and 1; with one GPU both ranks
    use gloo on CUDA tensors of GPU 0 (said in the JSON); the dry run uses gloo on the CPU.
    """
    gpus = torch.cuda.device_count() if check.gpu else 0
    backend = "nccl" if gpus >= 2 else "gloo"
    device = "cuda" if check.gpu else "cpu"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, GPU_CHECK_BACKEND=backend, GPU_CHECK_DEVICE=device)
        procs.append(subprocess.Popen([sys.executable, __file__, "--process-group-worker"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            return {"status": "failed: the 2-process group timed out"}
        outs.append((proc.returncode, stdout, stderr))
    lines = [next((ln for ln in o.splitlines() if ln.startswith("PG ")), None) for _, o, _ in outs]
    if any(rc != 0 for rc, _, _ in outs) or None in lines:
        return {"status": f"failed: exits {[rc for rc, _, _ in outs]}: {(outs[0][2] or outs[1][2])[-600:]}"}
    ranks = [json.loads(line[3:]) for line in lines]
    correct = all(r["correct"] for r in ranks)
    figures = {"processes": 2, "backend": backend, "device": device, "gpus": gpus,
               "placement": ("one GPU per rank (NCCL)" if backend == "nccl" else
                             "both ranks on GPU 0 with gloo on CUDA tensors (NCCL cannot put two ranks on one GPU)"
                             if check.gpu else "CPU, gloo"), "ranks": ranks}
    return {"status": check.status(correct), "dry_run" if check.dry else "figures": figures}


def process_group_worker() -> None:
    import torch.distributed as dist

    from dist_seg import distributed as D
    from dist_seg.knn import distributed_knn, knn

    backend, kind = os.environ["GPU_CHECK_BACKEND"], os.environ["GPU_CHECK_DEVICE"]
    rank = int(os.environ["RANK"])
    if kind == "cuda":
        device = torch.device("cuda", rank if backend == "nccl" else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    world = dist.get_world_size()
    checks = {}
    total = D.all_reduce_sum(torch.full((3,), float(rank + 1), device=device))
    checks["all_reduce_sum"] = torch.equal(total.cpu(), torch.full((3,), 3.0))
    gathered = D.all_gather(torch.tensor([rank], device=device))
    checks["all_gather"] = gathered.cpu().tolist() == [0, 1]
    variable = D.all_gather_variable(torch.full((rank + 2, 3), float(rank), device=device))
    checks["all_gather_variable"] = variable.shape == (5, 3) and variable[:2].eq(0).all().item() and \
        variable[2:].eq(1).all().item()
    y = torch.full((2,), float(rank), device=device, requires_grad=True)
    (D.all_gather_with_grad(y) * torch.arange(1.0, 5.0, device=device)).sum().backward()
    # d/dy of sum over ranks of the same loss: each rank's slot weight, summed over the 2 ranks' losses
    expected = torch.arange(1.0, 5.0)[2 * rank: 2 * rank + 2] * world
    checks["all_gather_with_grad"] = torch.allclose(y.grad.cpu(), expected)
    checks["broadcast_object"] = D.broadcast_object({"rank": rank}) == {"rank": 0}
    checks["all_gather_object"] = D.all_gather_object(rank) == [0, 1]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(301, 16, generator=gen)
    lo = [0, 120][rank]
    local = x[lo: [120, 301][rank]].to(device)
    sims, index = distributed_knn(local, 5, exclude_self=True, backend="torch")
    ref_s, ref_i = knn(x, x, 5, exclude_self=True, backend="torch")
    checks["distributed_knn"] = torch.equal(index.cpu(), ref_i) and torch.allclose(sims.cpu(), ref_s)
    numel = (256 if kind == "cuda" else 4) * 2**20 // 4
    buf = torch.ones(numel, device=device)
    seconds = _timed(lambda: dist.all_reduce(buf), warmup=2, repeats=5)
    D.barrier()
    print("PG " + json.dumps({"rank": rank, "backend": dist.get_backend(), "world_size": world,
                              "device": str(device), "correct": all(checks.values()), "checks": checks,
                              "all_reduce_mib": numel * 4 / 2**20, "all_reduce_ms": 1e3 * seconds,
                              "all_reduce_bus_gb_per_s": numel * 4 / seconds / 1e9}), flush=True)
    dist.destroy_process_group()


ITEMS = {
    "environment": environment,
    "matmul-bf16": matmul_bf16,
    "encode": encode,
    "decode": decode,
    "attention": attention,
    "train-stego-online": lambda c: train_item(c, "stego", "online"),
    "train-stego-cached": lambda c: train_item(c, "stego", "cached"),
    "train-ds2dl-online": lambda c: train_item(c, "ds2dl", "online"),
    "train-ds2dl-cached": lambda c: train_item(c, "ds2dl", "cached"),
    "host-syncs": host_syncs,
    "bench-train-in-memory": bench_train,
    "knn-torch": knn_torch,
    "knn-faiss-gpu": knn_faiss_gpu,
    "collectives": collectives,
    # Last: DeepSpeed leaves a process group behind in this process.
    "deepspeed-zero2": deepspeed_zero2,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes; GPU-only items 'skipped: no GPU'")
    parser.add_argument("--json", default=None, help="where to write the figures (default: $OUT/gpu_check.json "
                                                     "when OUT is set, else gpu_check.json)")
    parser.add_argument("--only", nargs="+", choices=list(ITEMS), default=None, help="run only these items")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--process-group-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.process_group_worker:
        process_group_worker()
        return 0
    target = Path(args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                else "gpu_check.json"))
    bench = _tool("bench_train")
    check_device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
            "machine": bench.machine(check_device), "code": bench.code_version(), "dry_run": args.dry_run,
            "results": {}}
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        check = Check(args.dry_run, Path(args.work or tmp))
        check.work.mkdir(parents=True, exist_ok=True)
        for name in args.only or ITEMS:
            t0 = time.perf_counter()
            try:
                entry = ITEMS[name](check)
            except Exception as err:  # noqa: BLE001 - one broken path must not hide the others' figures
                first = str(err).splitlines()[0][:300] if str(err) else ""
                entry = {"status": f"failed: {type(err).__name__}: {first}",
                         "traceback": traceback.format_exc()[-3000:]}
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            info["results"][name] = entry
            print(f"# {name}: {entry['status']} ({entry['seconds']} s)", flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(info, indent=2, default=str) + "\n")  # after every item: a kill keeps some
    print(f"{'item':<22} {'seconds':>8}  status")
    for name, entry in info["results"].items():
        print(f"{name:<22} {entry['seconds']:>8.1f}  {entry['status']}")
    print(f"# figures written to {target}")
    failed = [n for n, e in info["results"].items() if e["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
