"""The GPU-only paths of dist_seg in one run, with one JSON of figures (started by tools/gpu_check.sh).

Items, each timed and reported on its own (a failing item is recorded and the others still run):

* ``environment``: torch, CUDA, the GPU, the versions of the packages the paths below use;
* ``attention``: the backbone's fused attention (``F.scaled_dot_product_attention`` in timm's blocks) under
  bf16 autocast with each SDPA kernel forced in turn (flash, memory-efficient, math), against an fp32 math
  reference: relative error and milliseconds per forward;
* ``train-stego-online``, ``train-stego-cached``, ``train-ds2dl-online``, ``train-ds2dl-cached``: the real
  trainer (``dist_seg.trainer.train``) with ``train.mixed_precision=bf16`` on generated data (features from
  a random-init ViT-S/8 at 224 px; the cached runs first write the feature cache with ``extract``), then
  the final checkpoint read back with ``torch.load(weights_only=True)``;
* ``bench-train``: ``tools/bench_train.py``'s step timing on the GPU (bf16, batch 32): the "GPU rows" of
  docs/benchmarks.md;
* ``knn-faiss-gpu``: ``dist_seg.knn.knn`` with the faiss-gpu backend against the torch backend on CUDA
  (same indices expected), skipped with the reason when faiss has no GPU support here;
* ``deepspeed-zero2``: the trainer under DeepSpeed ZeRO-2 on one GPU in bf16, checkpointing, then a second
  run resuming from DeepSpeed's shards (read through dist_seg's weights-only loader);
* ``nccl``: a one-GPU NCCL process group in a fresh process, through ``dist_seg.distributed`` (all-reduce,
  all-gather with and without gradient, object broadcast), with an all-reduce bandwidth figure.

``--dry-run`` runs the same code on the CPU at tiny sizes (toy backbone, fp32, gloo instead of NCCL, the
math kernel only) and reports every GPU-only item as ``"skipped: no GPU"`` with what the CPU run did under
``"dry_run"``: CI runs it (tests/test_gpu_check.py), so the script cannot rot unnoticed.

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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NO_GPU = "skipped: no GPU"
PACKAGES = ("torch", "timm", "accelerate", "deepspeed", "faiss-gpu", "faiss-cpu", "webdataset", "wids", "omegaconf",
            "pydantic", "numpy", "dist_seg")


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
        self.steps = 20 if self.gpu else 2
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
                "train.val_every=0", f"train.checkpoint_every={self.steps}", "train.log_every=1",
                "tracking.enabled=false", "eval.num_overlays=0", *(["stego.feature_samples=5"] if method == "stego"
                                                                   else []), *extra]


# ------------------------------------------------------------------------------------------ items
def environment(check: Check) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    out = {"status": "ok", "python": sys.version.split()[0], "packages": versions,
           "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
    return out


def attention(check: Check) -> dict:
    """Patch features with each SDPA kernel forced, against fp32 math attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dist_seg.backbones import load_backbone

    backbone = load_backbone(check.backbone, check.backbone_weights(), dtype=check.precision).to(check.device)
    torch.manual_seed(0)
    images = torch.rand(8 if check.gpu else 2, 3, check.size, check.size, device=check.device)
    with torch.no_grad():
        backbone.autocast_dtype = None  # fp32 math reference
        with sdpa_kernel([SDPBackend.MATH]):
            ref = backbone.patch_features(images).float()
        backbone.autocast_dtype = torch.bfloat16 if check.gpu else None
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
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    ckpt = out / "checkpoints" / f"step-{check.steps:08d}.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    load_checkpoint(ckpt)
    metrics = result.get("metrics", {})
    ok = result["step"] == check.steps and state["step"] == check.steps
    return {"status": check.status(ok), "dry_run" if check.dry else "figures": {
        "steps": result["step"], "batch": check.batch, "res": check.size, "backbone": check.backbone,
        "mixed_precision": check.precision, "train_wall_s": wall, "extract_wall_s": t_extract,
        "crops_per_s_including_setup": check.steps * check.batch / wall,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if check.gpu else None,
        "checkpoint_weights_only": True, "val": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}}


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


def knn_faiss_gpu(check: Check) -> dict:
    from dist_seg.knn import knn

    try:
        import faiss
        gpu_faiss = hasattr(faiss, "StandardGpuResources")
    except ImportError:
        gpu_faiss = False
    n, d, k = (50_000, 384, 30) if check.gpu else (512, 16, 5)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(n, d, generator=gen).to(check.device)
    _sync()
    t0 = time.perf_counter()
    sim_t, idx_t = knn(feats, feats, k, exclude_self=True, backend="torch")
    _sync()
    torch_s = time.perf_counter() - t0
    figures = {"n": n, "dim": d, "k": k, "torch_s": torch_s, "torch_queries_per_s": n / torch_s}
    if not check.gpu:
        return {"status": NO_GPU, "dry_run": figures}
    if not gpu_faiss:
        return {"status": "skipped: faiss has no GPU support here (faiss-gpu's wheel is ~135 MB plus the CUDA 12 "
                          "runtime, over the 64 MiB the device call carries; the image has no faiss)",
                "figures": figures}
    t0 = time.perf_counter()
    sim_f, idx_f = knn(feats, feats, k, exclude_self=True, backend="faiss-gpu")
    _sync()
    faiss_s = time.perf_counter() - t0
    same = float((idx_f.cpu() == idx_t.cpu()).float().mean())
    figures.update(faiss_gpu_s=faiss_s, faiss_gpu_queries_per_s=n / faiss_s, same_indices_fraction=same,
                   max_similarity_diff=float((sim_f.cpu() - sim_t.cpu()).abs().max()))
    return {"status": "ok" if same == 1.0 else f"failed: {1 - same:.2%} of the indices differ", "figures": figures}


def deepspeed_zero2(check: Check) -> dict:
    from dist_seg.config import merge
    from dist_seg.trainer import load_recipe, train

    out = check.work / "run-deepspeed"
    ds = str(REPO / "launch" / "deepspeed_zero2.json")
    base = load_recipe(str(REPO / "recipes" / "stego_toy.py"))()
    half = max(1, check.steps // 2)
    first = merge(base, overrides=check.overrides("stego", "online", out, f"train.deepspeed_config={ds}",
                                                  f"train.num_steps={half}", f"train.checkpoint_every={half}"))
    t0 = time.perf_counter()
    train(first)
    first_s = time.perf_counter() - t0
    shards = sorted(p.name for p in (out / "checkpoints" / "deepspeed" / f"step-{half:08d}").iterdir())
    # The resumed run is a fresh `dist-seg train` process, as after a preemption (DeepSpeed's process groups
    # also cannot be rebuilt inside one process). It reads DeepSpeed's shards through the weights-only loader.
    cmd = [sys.executable, "-m", "dist_seg.cli", "train", str(REPO / "recipes" / "stego_toy.py"),
           *check.overrides("stego", "online", out, f"train.deepspeed_config={ds}", f"train.num_steps={2 * half}",
                            f"train.checkpoint_every={half}")]
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
    ok = state["step"] == 2 * half and any("optim_states" in s for s in shards) and "resumed from" in res.stderr
    return {"status": check.status(ok), "dry_run" if check.dry else "figures": {
        "first_run_steps": half, "first_run_s": first_s, "resumed_to": state["step"], "resumed_run_s": resume_s,
        "resumed_log": next((ln for ln in res.stderr.splitlines() if "resumed from" in ln), None),
        "shards": shards, "mixed_precision": check.precision}}


def nccl(check: Check) -> dict:
    """A one-rank process group in a fresh process (NCCL on the GPU, gloo in the dry run)."""
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), GPU_CHECK_BACKEND="nccl" if check.gpu else "gloo")
    res = subprocess.run([sys.executable, __file__, "--process-group-worker"], env=env, capture_output=True,
                         text=True, timeout=180)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("PG ")), None)
    if res.returncode != 0 or line is None:
        return {"status": f"failed: exit {res.returncode}: {(res.stderr or res.stdout)[-400:]}"}
    figures = json.loads(line[3:])
    return {"status": check.status(figures["correct"]), "dry_run" if check.dry else "figures": figures}


def process_group_worker() -> None:
    import torch.distributed as dist

    from dist_seg import distributed as D

    backend = os.environ["GPU_CHECK_BACKEND"]
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    # dist_seg.distributed short-cuts a one-rank world, so the collectives are called on the group directly
    # (what the helpers call on several ranks), then the helpers' one-rank paths are checked too.
    x = torch.arange(6.0, device=device)
    total = torch.ones(3, device=device)
    dist.all_reduce(total)
    parts = [torch.empty_like(x)]
    dist.all_gather(parts, x)
    box = [{"a": 1}]
    dist.broadcast_object_list(box, src=0)
    y = x.clone().requires_grad_(True)
    D.all_gather_with_grad(y).sum().backward()
    correct = (torch.equal(total.cpu(), torch.ones(3)) and torch.equal(parts[0].cpu(), x.cpu())
               and box == [{"a": 1}] and torch.equal(y.grad.cpu(), torch.ones(6)) and D.get_world_size() == 1
               and D.all_gather_object(5) == [5])
    numel = (256 if backend == "nccl" else 1) * 2**20 // 4
    buf = torch.ones(numel, device=device)
    dist.all_reduce(buf)
    _sync()
    t0 = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(buf)
    _sync()
    seconds = (time.perf_counter() - t0) / 5
    print("PG " + json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(), "correct": correct,
                              "all_reduce_mib": numel * 4 / 2**20, "all_reduce_ms": 1e3 * seconds}), flush=True)
    dist.destroy_process_group()


ITEMS = {
    "environment": environment,
    "attention": attention,
    "train-stego-online": lambda c: train_item(c, "stego", "online"),
    "train-stego-cached": lambda c: train_item(c, "stego", "cached"),
    "train-ds2dl-online": lambda c: train_item(c, "ds2dl", "online"),
    "train-ds2dl-cached": lambda c: train_item(c, "ds2dl", "cached"),
    "bench-train": bench_train,
    "knn-faiss-gpu": knn_faiss_gpu,
    "nccl": nccl,
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
