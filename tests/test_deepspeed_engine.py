"""DeepSpeed ZeRO-2 on two CPU ranks (gloo): training, agreement with DDP, checkpoint and exact resume.

DeepSpeed picks its CPU accelerator when no GPU is present; its communication backend is then gloo
(oneCCL is not installed). What only a GPU exercises (nccl, bf16/fp16 weights, the Accelerate
DeepSpeed plugin) is listed in docs/scaling.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

WORLD = 2
LOCAL_BATCH = 2
NUM_STEPS = 4
SAVE_AT = 2
ZERO2_JSON = Path(__file__).resolve().parent.parent / "launch" / "deepspeed_zero2.json"


def _method(seed: int):
    from dist_seg.config import RunConfig, StegoConfig
    from dist_seg.methods import build_method

    torch.manual_seed(seed)
    # lr high enough that a few Adam steps visibly move every parameter.
    cfg = RunConfig(method="stego", stego=StegoConfig(dim=8, dropout=0.0, feature_samples=4, neg_samples=2,
                                                      lr=1e-2, probe_lr=1e-2))
    return build_method(cfg, feat_dim=16, num_classes=3, has_labels=False)


def _batch(step: int, rank: int, world: int):
    """This rank's rows of a global batch that depends only on the step (as the data loader guarantees)."""
    from dist_seg.methods.base import Batch, StepContext

    gen = torch.Generator().manual_seed(1000 + step)
    feats = torch.randn(LOCAL_BATCH * world, 16, 6, 6, generator=gen)
    partners = torch.randn(LOCAL_BATCH * world, 16, 6, 6, generator=gen)
    ctx = StepContext(step=step, seed=0, rank=rank, world_size=world, local_batch=LOCAL_BATCH)
    return Batch(feats=ctx.local(feats), partner_feats=ctx.local(partners)), ctx


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_zero2(engine, rank: int, steps: range, world: int = WORLD) -> list[float]:
    losses = []
    for step in steps:
        batch, ctx = _batch(step, rank, world)
        loss, logs = engine.forward(batch, ctx)
        assert "loss_stego" in logs, f"the method's logs must come through the engine, got {sorted(logs)}"
        engine.backward(loss)
        engine.step()
        engine.module.after_step()
        losses.append(float(loss.detach()))
    return losses


def _zero2_worker(rank: int, world: int, ckpt_dir: str) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from dist_seg.ds_engine import DeepSpeedEngine

    init = _params(_method(seed=0))

    # Reference: plain DDP with the method's own Adam on the same global batches.
    ref = _method(seed=0)
    ddp = DistributedDataParallel(ref)
    opt = ref.build_optimizer()
    for step in range(NUM_STEPS):
        batch, ctx = _batch(step, rank, world)
        loss, _ = ddp(batch, ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ref.after_step()

    # Uninterrupted ZeRO-2 run.
    method = _method(seed=0)
    engine = DeepSpeedEngine(method, method.build_optimizer(), str(ZERO2_JSON), micro_batch_size=LOCAL_BATCH)
    optimizer_kind = type(engine.optimizer).__name__
    group_names = [g.get("name") for g in engine.optimizer.param_groups]
    group_lrs = [g["lr"] for g in engine.optimizer.param_groups]
    partition_numel = sum(p.numel() for g in engine.optimizer.param_groups for p in g["params"])
    full_numel = sum(p.numel() for p in engine.module.parameters())
    losses = _train_zero2(engine, rank, range(NUM_STEPS))
    full = _params(engine.module)

    # Interrupted run: SAVE_AT steps, checkpoint, then a fresh engine (other random init) resumes.
    method = _method(seed=0)
    first = DeepSpeedEngine(method, method.build_optimizer(), str(ZERO2_JSON), micro_batch_size=LOCAL_BATCH)
    _train_zero2(first, rank, range(SAVE_AT))
    first.save(ckpt_dir, f"step-{SAVE_AT:08d}", {"step": SAVE_AT, "note": f"rank {rank}"})
    dist.barrier()
    files = sorted(p.name for p in Path(ckpt_dir, f"step-{SAVE_AT:08d}").iterdir())

    method = _method(seed=1)
    fresh_differs = any(not torch.equal(v, init[k]) for k, v in _params(method).items())
    resumed = DeepSpeedEngine(method, method.build_optimizer(), str(ZERO2_JSON), micro_batch_size=LOCAL_BATCH)
    client = resumed.load(ckpt_dir)  # tag from ckpt_dir/latest
    loaded_steps = resumed.global_steps
    _train_zero2(resumed, rank, range(client["step"], NUM_STEPS))
    return {"init": init, "ddp": _params(ref), "zero2": full, "resumed": _params(resumed.module),
            "losses": losses, "client": client, "loaded_steps": loaded_steps, "files": files,
            "optimizer_kind": optimizer_kind, "group_names": group_names, "group_lrs": group_lrs,
            "partition_numel": partition_numel, "full_numel": full_numel, "fresh_differs": fresh_differs}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> list[dict]:
    ckpt_dir = tmp_path_factory.mktemp("ds_ckpt")
    return run_distributed(_zero2_worker, WORLD, str(ckpt_dir))


def test_zero2_partitions_the_methods_optimizer(zero2_run):
    for rank, out in enumerate(zero2_run):
        assert out["optimizer_kind"] == "DeepSpeedZeroOptimizer", f"rank {rank}: got {out['optimizer_kind']}"
        assert out["group_names"] == ["head", "probes"], f"rank {rank}: parameter groups {out['group_names']}"
        assert out["group_lrs"] == [1e-2, 1e-2], f"rank {rank}: learning rates {out['group_lrs']}"
        # ZeRO-2: each rank's optimiser holds about 1/world of the flattened parameters (plus padding).
        assert out["partition_numel"] < out["full_numel"] * 0.75, (
            f"rank {rank}: optimiser holds {out['partition_numel']} of {out['full_numel']} values, not a shard")


def test_zero2_trains_and_ranks_agree(zero2_run):
    r0, r1 = zero2_run
    assert len(set(r0["losses"])) > 1, f"loss never changed: {r0['losses']}"
    assert all(torch.isfinite(torch.tensor(out["losses"])).all() for out in zero2_run)
    moved = [k for k in r0["init"] if not torch.allclose(r0["zero2"][k], r0["init"][k])]
    assert set(moved) == set(r0["init"]), f"parameters that never moved: {set(r0['init']) - set(moved)}"
    for k in r0["zero2"]:
        assert torch.equal(r0["zero2"][k], r1["zero2"][k]), f"{k} differs between ranks after ZeRO-2 steps"


def test_zero2_matches_ddp_with_the_same_optimizer(zero2_run):
    for rank, out in enumerate(zero2_run):
        for k, ref in out["ddp"].items():
            torch.testing.assert_close(out["zero2"][k], ref, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, k=k, rank=rank: f"rank {rank}, {k}: ZeRO-2 vs DDP: {m}")


def test_zero2_checkpoint_resume_is_exact(zero2_run):
    for rank, out in enumerate(zero2_run):
        # DeepSpeed writes the client state in rank 0's model file only: every rank gets rank 0's copy back
        # (the trainer gathers per-rank values such as RNG states into it before saving).
        assert out["client"] == {"step": SAVE_AT, "note": "rank 0"}, f"rank {rank}: client state {out['client']}"
        assert out["loaded_steps"] == SAVE_AT, f"rank {rank}: engine step after load is {out['loaded_steps']}"
        assert out["fresh_differs"], "the resumed engine must start from other weights for the test to mean anything"
        shards = [f for f in out["files"] if "optim_states" in f]
        assert len(shards) == WORLD, f"expected one optimiser shard per rank, found {out['files']}"
        for k, v in out["zero2"].items():
            assert torch.equal(out["resumed"][k], v), f"rank {rank}, {k}: resumed run differs from uninterrupted run"


def test_resolve_ds_config_fills_auto_values():
    from dist_seg.ds_engine import resolve_ds_config

    raw = json.loads(ZERO2_JSON.read_text())
    cfg = resolve_ds_config(ZERO2_JSON, micro_batch_size=4, gradient_clipping=1.5, mixed_precision="bf16")
    assert raw["zero_optimization"]["stage"] == 2, "launch/deepspeed_zero2.json must select ZeRO stage 2"
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert "train_batch_size" not in cfg or cfg["train_batch_size"] != "auto"
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(cfg), f"unresolved 'auto' left: {cfg}"


@pytest.mark.parametrize("change, message", [
    ({"zero_optimization": {"stage": 3}}, "stage 2"),
    ({"optimizer": {"type": "Adam"}}, "builds its own optimiser"),
    ({"gradient_accumulation_steps": 4}, "global batch"),
])
def test_resolve_ds_config_rejects_what_the_wrapper_cannot_honour(change, message):
    from dist_seg.ds_engine import resolve_ds_config

    cfg = {**json.loads(ZERO2_JSON.read_text()), **change}
    with pytest.raises(ValueError, match=message):
        resolve_ds_config(cfg)


def test_half_precision_is_refused_on_cpu():
    from dist_seg.ds_engine import resolve_ds_config

    with pytest.raises(ValueError, match="train.mixed_precision=no"):
        resolve_ds_config(ZERO2_JSON, mixed_precision="fp16", device_type="cpu")
    cfg = resolve_ds_config(ZERO2_JSON, mixed_precision="no", device_type="cpu")
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def single_process_main(ckpt_dir: str) -> None:
    """Body of a plain ``python`` process (no launcher, no process group): prints a JSON report."""
    import torch.distributed as dist

    from dist_seg.ds_engine import DeepSpeedEngine

    assert not dist.is_initialized()
    ref = _method(seed=0)
    opt = ref.build_optimizer()
    method = _method(seed=0)
    engine = DeepSpeedEngine(method, method.build_optimizer(), str(ZERO2_JSON), micro_batch_size=LOCAL_BATCH,
                             gradient_clipping=1e6)
    for step in range(SAVE_AT):
        batch, ctx = _batch(step, 0, 1)
        loss, _ = ref(batch, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _train_zero2(engine, 0, range(SAVE_AT), world=1)
    engine.save(ckpt_dir, "only", {"step": SAVE_AT})
    other = _method(seed=1)
    try:
        DeepSpeedEngine(other, _method(seed=1).build_optimizer(), str(ZERO2_JSON))
        foreign_error = ""
    except ValueError as err:
        foreign_error = str(err)
    reloaded = DeepSpeedEngine(other, other.build_optimizer(), str(ZERO2_JSON))
    client = reloaded.load(ckpt_dir, tag="only")
    try:
        reloaded.load(ckpt_dir, tag="missing")
        missing_error = ""
    except FileNotFoundError as err:
        missing_error = str(err)
    # DeepSpeed's shards are read weights-only: a shard replaced by a pickle that would run code is refused.
    from dist_seg.checkpoints import CheckpointError
    from tests.test_checkpoints import RunsCode

    marker = Path(ckpt_dir) / "MARKER"
    shard = next((Path(ckpt_dir) / "only").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": RunsCode(marker)}, shard)
    try:
        reloaded.load(ckpt_dir, tag="only")
        malicious_error = ""
    except CheckpointError as err:
        malicious_error = str(err)
    ours, theirs, back = _params(engine.module), _params(ref), _params(reloaded.module)
    print("REPORT " + json.dumps({
        "loader": type(reloaded.engine.checkpoint_engine).__name__, "malicious_error": malicious_error,
        "marker_written": marker.exists(),
        "world": dist.get_world_size(), "backend": dist.get_backend(), "client": client,
        "max_diff_vs_torch": max(float((ours[k] - theirs[k]).abs().max()) for k in ours),
        "reload_exact": all(torch.equal(back[k], ours[k]) for k in ours),
        "missing_error": missing_error, "foreign_error": foreign_error,
    }))


def test_single_plain_process_gets_a_one_rank_group(tmp_path):
    """On one GPU the trainer's Accelerator starts no process group; the engine must make its own."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    code = f"from tests.test_deepspeed_engine import single_process_main; single_process_main({str(tmp_path)!r})"
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"single-process DeepSpeed run failed:\n{(res.stdout + res.stderr)[-4000:]}"
    report = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert report["world"] == 1 and report["backend"] == "gloo", report
    assert report["max_diff_vs_torch"] < 1e-5, f"ZeRO-2 on one rank drifts from torch Adam: {report}"
    assert report["reload_exact"] and report["client"] == {"step": SAVE_AT}, report
    assert "no DeepSpeed checkpoint" in report["missing_error"], report
    assert "build_optimizer" in report["foreign_error"], report
    assert report["loader"] == "WeightsOnlyCheckpointEngine", report
    assert "(exec)" in report["malicious_error"] and not report["marker_written"], report
