"""MaskDistill on COCO20k with the paper's settings (SPEC §8; transductive: trains and tests on the same images).

    dist-seg prepare coco20k --src <folder holding train2014/ and annotations/> --out data/coco20k
    dist-seg maskdistill maskdistill_coco20k maskdistill.detect.weights=R50.pth maskdistill.distil.weights=R50.pth

80 thing classes + background. The pseudo-label dataset carries the ground truth of the same images as
``train_gt`` for validation. The paper reports class-agnostic mask AP50 on COCO20k (6.8, Table 3): the
pipeline's eval scores it beside the §8.6 segmentation scores (``dist-seg eval-instances maskdistill_coco20k``
scores every miner's masks and the candidates on their own; docs/maskdistill.md).
"""

from dist_seg.config import BackboneConfig, DataConfig, EvalConfig, RunConfig, TrainConfig
from dist_seg.maskdistill.config import DistilConfig, MaskDistillConfig, NameConfig
from dist_seg.pipeline import run_maskdistill_recipe


def config() -> RunConfig:
    return RunConfig(
        method="maskdistill",
        data=DataConfig(dataset="coco20k", root="data/coco20k", train_split="train", val_split="train", res=512,
                        eval_res=512, batch_size=16, num_workers=4, shuffle_buffer=1000),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs (docs/decisions.md, issue 20 precision).
        backbone=BackboneConfig(name="dino_vits8", dtype="auto"),
        maskdistill=MaskDistillConfig(name=NameConfig(num_clusters=80), distil=DistilConfig(student="deeplab")),
        train=TrainConfig(output_dir="runs/maskdistill_coco20k", checkpoint_every=1000, val_every=5000,
                          log_every=20),
        eval=EvalConfig(num_overlays=8),
    )


if __name__ == "__main__":
    raise SystemExit(run_maskdistill_recipe(config))
