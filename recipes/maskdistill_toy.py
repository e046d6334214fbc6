"""MaskDistill end to end on the generated toy_objects scenes, in CPU minutes (SPEC §8 at tiny sizes).

    dist-seg prepare toy_objects --out data/toy_objects --num-train 128 --num-val 32   # or let the pipeline do it
    dist-seg maskdistill maskdistill_toy [key=value ...]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/maskdistill_toy.py

Every network starts from random weights (the toy ViT backbone, Mask R-CNN and DeepLab with
``init=random``): nothing is downloaded. On the random-init toy backbone the attention carries no real
objectness, so the mined masks, and everything distilled from them, score little above chance; the
recipe shows that the stages run and connect, not that the method works (docs/results.md).
"""

from dist_seg.config import BackboneConfig, DataConfig, EvalConfig, RunConfig, TrainConfig
from dist_seg.maskdistill.config import (
    DetectConfig,
    DistilConfig,
    MaskDistillConfig,
    MineConfig,
    NameConfig,
)
from dist_seg.pipeline import run_maskdistill_recipe


def config() -> RunConfig:
    return RunConfig(
        method="maskdistill",
        data=DataConfig(dataset="toy_objects", root="data/toy_objects", res=96, eval_res=96, batch_size=8,
                        num_workers=0, shuffle_buffer=64),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs (docs/decisions.md, issue 20 precision).
        backbone=BackboneConfig(name="toy", dtype="auto"),
        maskdistill=MaskDistillConfig(
            mine=MineConfig(backbone="toy", heads=2, short_side=96),
            name=NameConfig(backbone="toy", num_clusters=3),
            detect=DetectConfig(init="random", batch_size=4, num_steps=30, base_lr=0.005, warmup_steps=5,
                                min_sizes=[96], max_size=160, test_min_size=96, detections_per_img=20,
                                rpn_post_nms_top_n_train=200, rpn_post_nms_top_n_test=100,
                                box_batch_size_per_image=64),
            distil=DistilConfig(student="deeplab", init="random", batch_size=8, epochs=2, lr_drop_after=1,
                                size=64, linear_epochs=2, linear_drop_after=1, linear_batch_size=8),
        ),
        train=TrainConfig(output_dir="runs/maskdistill_toy", checkpoint_every=20, val_every=0, log_every=5,
                          grad_clip=1.0),
        eval=EvalConfig(num_overlays=4),
    )


if __name__ == "__main__":
    raise SystemExit(run_maskdistill_recipe(config))
