"""Method ``maskrcnn`` (SPEC §8.3): its data stream, learning-rate schedule, and data parallelism on 2 gloo ranks.

Mask R-CNN normalises each loss term over the rank's own sampled anchors / proposals / positive masks, and
samples them with the rank's RNG (as torchvision and detectron2 do), so a 2-rank step is not the loss of
the full global batch on one process. What must hold exactly is that 2 ranks train like one process that
averages the gradients of the ranks' half-batches: the test replays that on one process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dist_seg.config import RunConfig, merge
from dist_seg.maskdistill.detect import (
    DetectError,
    DetectionData,
    augment_sample,
    detection_batches,
    global_batch_ids,
    lr_factor,
)
from dist_seg.maskdistill.files import MaskDistillFileError, read_json, write_json_atomic
from tests._detect_data import detect_overrides, make_detect_dataset, one_thread  # noqa: F401
from tests.dist_utils import run_distributed


@pytest.fixture(scope="module")
def detect_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("detect_data")
    make_detect_dataset(root)
    return root


def _stream(data, *, rank=0, world=1, local=4, start=0, sizes=(48, 64)):
    return detection_batches(data, seed=3, start_step=start, local_batch=local, rank=rank, world_size=world,
                             min_sizes=sizes, max_size=96, flip_prob=0.5)


def test_stream_depends_only_on_seed_step_and_rank(detect_root):
    data = DetectionData(detect_root, "train", detect_root / "maskdistill" / "masks_train.json")
    assert data.num_clusters == 2 and data.num_skipped == 1 and 5 not in data.ids
    one = _stream(data)
    steps = [next(one) for _ in range(3)]
    # Two ranks of 2 images see exactly the 1-rank global batch of 4, split in order.
    halves = [_stream(data, rank=r, world=2, local=2) for r in range(2)]
    for step, (images, targets, ids) in enumerate(steps):
        parts = [next(h) for h in halves]
        assert torch.equal(torch.cat([p[2] for p in parts]), ids), f"step {step}: ranks do not split the global batch"
        for got, want in zip([im for p in parts for im in p[0]], images):
            assert torch.equal(got, want)
        for got, want in zip([t for p in parts for t in p[1]], targets):
            assert all(torch.equal(got[k], want[k]) for k in ("boxes", "labels", "masks"))
    # A stream started at step 2 (a resumed run) begins with step 2's batch.
    resumed = next(_stream(data, start=2))
    assert torch.equal(resumed[2], steps[2][2]) and all(torch.equal(a, b) for a, b in zip(resumed[0], steps[2][0]))
    seen = [int(i) for s in steps for i in s[2]]
    assert 5 not in seen, "the image without a mask is skipped"
    assert sorted(seen[:5]) == data.ids, "an epoch visits every masked image once"
    shorts = {min(im.shape[-2:]) for s in steps for im in s[0]}
    assert shorts <= {48, 64} and len(shorts) == 2, f"short sides drawn from min_sizes, got {shorts}"
    for images, targets, _ in steps:
        for image, target in zip(images, targets):
            assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1, "0..1, not normalised"
            assert max(image.shape[-2:]) <= 96
            assert target["labels"].tolist() and set(target["labels"].tolist()) <= {1, 2}
            assert target["masks"].shape[-2:] == image.shape[-2:]


def test_augment_resizes_flips_and_boxes_the_masks():
    image = torch.zeros(3, 20, 40, dtype=torch.uint8)
    masks = torch.zeros(2, 20, 40, dtype=torch.bool)
    masks[0, 2:6, 4:10] = True
    masks[1, 10, 30] = True  # one pixel: vanishes at half size? (nearest keeps or drops it, never half)
    image[:, 2:6, 4:10] = 255
    out, target = augment_sample(image, masks, torch.tensor([1, 2]), short_side=40, max_size=1000, flip=True)
    assert out.shape == (3, 40, 80), "short side 20 -> 40, aspect kept"
    assert target["boxes"][0].tolist() == [80 - 20, 4, 80 - 8, 12], "box of the flipped, doubled mask"
    assert torch.equal(out[0] > 0.5, target["masks"][0].bool()), "image and mask flipped together"
    out, target = augment_sample(image, masks, torch.tensor([1, 2]), short_side=800, max_size=60, flip=False)
    assert out.shape == (3, 30, 60), "the long side is capped at max_size"
    small, target = augment_sample(image, masks, torch.tensor([1, 2]), short_side=5, max_size=1000, flip=False)
    assert len(target["labels"]) == len(target["boxes"]) == len(target["masks"]) <= 2
    assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all(), "no empty box survives"


def test_global_batches_are_epochs_of_permutations():
    ids = [3, 7, 9, 11, 20]
    first = [i for s in range(5) for i in global_batch_ids(ids, s, 2, seed=0)]
    assert sorted(first[:5]) == ids and sorted(first[5:10]) == ids
    assert first != [i for s in range(5) for i in global_batch_ids(ids, s, 2, seed=1)], "seed changes the order"


def test_lr_schedule_warmup_and_milestones():
    kw = dict(num_steps=24000, warmup_steps=100, warmup_factor=1e-3, milestones=[20000 / 24000, 22000 / 24000],
              gamma=0.1)
    assert lr_factor(0, **kw) == pytest.approx(1e-3)
    assert lr_factor(50, **kw) == pytest.approx(1e-3 * 0.5 + 0.5)
    assert lr_factor(100, **kw) == 1.0 and lr_factor(19999, **kw) == 1.0
    assert lr_factor(20000, **kw) == pytest.approx(0.1) and lr_factor(22000, **kw) == pytest.approx(0.01)
    assert lr_factor(2, **{**kw, "num_steps": 4, "warmup_steps": 0, "milestones": [0.5]}) == pytest.approx(0.1)


def test_masks_file_errors_name_the_stage_to_run(detect_root, tmp_path):
    with pytest.raises(MaskDistillFileError, match="dist-seg masks"):
        DetectionData(detect_root, "train", tmp_path / "nope.json")
    doc = read_json(detect_root / "maskdistill" / "masks_train.json", what="x", made_by="y")
    for ann in doc["annotations"]:
        ann.pop("category_id")
    unnamed = write_json_atomic(doc, tmp_path / "unnamed.json")
    with pytest.raises(DetectError, match="dist-seg name"):
        DetectionData(detect_root, "train", unnamed)
    doc["annotations"] = []
    with pytest.raises(DetectError, match="none of its 6 images"):
        DetectionData(detect_root, "train", write_json_atomic(doc, tmp_path / "empty.json"))


def test_missing_weights_stop_the_trainer_with_the_fix(detect_root, tmp_path):
    from dist_seg.trainer import Trainer

    cfg = merge(RunConfig(), overrides=[*detect_overrides(detect_root, tmp_path / "run"),
                                        "maskdistill.detect.init=ssl"])
    with pytest.raises(DetectError, match=r"maskdistill\.detect\.weights=.*maskdistill\.detect\.init=random"):
        Trainer(cfg)


# ------------------------------------------------------------------------------------------- 2 ranks
STEPS = 2


def _cfg(root: str, out: str):
    return merge(RunConfig(), overrides=detect_overrides(Path(root), Path(out), f"train.num_steps={STEPS}",
                                                         "train.checkpoint_every=100"))


def _train_on_ranks(rank: int, world: int, root: str, out: str) -> dict:
    os.environ["ACCELERATE_USE_CPU"] = "1"
    from dist_seg.maskdistill.detect import predict_candidates, read_candidates
    from dist_seg.trainer import Trainer, list_checkpoints

    cfg = _cfg(root, out)
    trainer = Trainer(cfg)
    trainer.fit()
    state = {k: v.detach().clone() for k, v in trainer.unwrapped.model.named_parameters() if v.requires_grad}
    # Prediction shards the images over the ranks and merges their parts on rank 0.
    checkpoint = list_checkpoints(cfg)[-1]
    path = predict_candidates(merge(cfg, overrides=[f"maskdistill.work_dir={out}/work"]), checkpoint)
    trainer.accelerator.end_training()
    return {"state": state, "checkpoint": str(checkpoint), "candidates": read_candidates(path)} if rank == 0 else {}


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_ranks_average_the_half_batch_gradients(detect_root, tmp_path):
    """The real trainer on 2 gloo ranks (1 image each) equals one process that runs each rank's half-batch with
    that rank's RNG and averages the gradients (what DDP promises); the stream split is tested above."""
    from dist_seg import distributed as D
    from dist_seg.maskdistill.detect import predict_candidates, read_candidates
    from dist_seg.methods.base import Batch, StepContext
    from dist_seg.trainer import Trainer

    ranks = run_distributed(_train_on_ranks, 2, str(detect_root), str(tmp_path / "ddp"))[0]
    got = ranks["state"]

    cfg = _cfg(str(detect_root), str(tmp_path / "replay"))
    trainer = Trainer(cfg)  # rank 0's initial weights: DDP broadcasts them to the other ranks
    method, optimizer = trainer.unwrapped, trainer.optimizer
    params = [p for p in method.parameters() if p.requires_grad]
    initial = {k: v.detach().clone() for k, v in method.model.named_parameters() if v.requires_grad}
    d = cfg.maskdistill.detect
    streams = [detection_batches(method.data, seed=cfg.train.seed, start_step=0, local_batch=1, rank=r, world_size=2,
                                 min_sizes=d.min_sizes, max_size=d.max_size, flip_prob=d.flip_prob) for r in range(2)]
    method.train()
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        method.before_step(step, optimizer)
        for rank, stream in enumerate(streams):
            images, targets, index = next(stream)
            # The trainer re-seeds the global RNG (Mask R-CNN's anchor/proposal sampling) from (seed, step, rank).
            torch.manual_seed(D.seeded_generator(cfg.train.seed, step, "torch", rank).initial_seed())
            ctx = StepContext(step=step, seed=cfg.train.seed, rank=rank, world_size=2, local_batch=1)
            loss, _ = method(Batch(images=images, targets=targets, index=index), ctx)
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
    trainer.accelerator.end_training()
    want = {k: v.detach() for k, v in method.model.named_parameters() if v.requires_grad}
    assert sorted(got) == sorted(want)
    assert any(not torch.equal(want[k], initial[k]) for k in want), "training must move the weights"
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")

    # The same checkpoint predicted on 1 process gives the 2-rank candidates file.
    single = predict_candidates(merge(cfg, overrides=[f"maskdistill.work_dir={tmp_path}/single"]),
                                ranks["checkpoint"])
    info, rows = read_candidates(single)
    two_info, two_rows = ranks["candidates"]
    assert (two_info["world_size"], info["world_size"]) == (2, 1) and two_info["num_images"] == info["num_images"] == 6
    assert rows and [r["image_id"] for r in two_rows] == [r["image_id"] for r in rows], "every image, merged in order"
    # Same weights, but the gloo ranks' CPU kernels round differently from this process (~1e-7 relative).
    for image_id in range(6):
        a = [r for r in two_rows if r["image_id"] == image_id]
        b = [r for r in rows if r["image_id"] == image_id]
        assert sorted(r["category_id"] for r in a) == sorted(r["category_id"] for r in b)
        torch.testing.assert_close(torch.tensor([r["score"] for r in a]), torch.tensor([r["score"] for r in b]),
                                   atol=1e-4, rtol=1e-4)
    assert not list((tmp_path / "ddp" / "work").glob(".*part*")), "the rank parts are removed after the merge"
