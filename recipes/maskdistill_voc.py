"""MaskDistill on PASCAL VOC 2012 with the paper's settings (SPEC §8; paper 003, official code).

    dist-seg prepare voc12 --src <folder holding VOCdevkit/ and SegmentationClassAug/> --out data/voc12
    dist-seg maskdistill maskdistill_voc maskdistill.detect.weights=R50.pth maskdistill.distil.weights=R50.pth

The Mask R-CNN and DeepLab backbones start from a local self-supervised ResNet-50 (MoCo or DINO keys);
without one the run stops and names the fix (``...init=random`` trains them from scratch instead).
Masks: ``dino_vits16``, short side 640, 5 heads, top-k 0.4, mass 0.5; naming: ``dino_vits8`` CLS of the
box crops, K = 20 clusters; Mask R-CNN: 24k iterations at a global batch of 16; pseudo-labels τ = 0.9;
student: DeepLab-v3 R50 OS 8, 45 epochs of trainaug (10,582 images) at a global batch of 16, 512×512;
linear protocol: 45 epochs at batch 24; CRF rounds: 0 (the official code's "+CRF" model uses 2).
"""

from dist_seg.config import BackboneConfig, DataConfig, EvalConfig, RunConfig, TrainConfig
from dist_seg.maskdistill.config import DistilConfig, MaskDistillConfig, NameConfig
from dist_seg.pipeline import run_maskdistill_recipe


def config() -> RunConfig:
    return RunConfig(
        method="maskdistill",
        data=DataConfig(dataset="voc12", root="data/voc12", train_split="trainaug", val_split="val", res=512,
                        eval_res=512, batch_size=16, num_workers=4, shuffle_buffer=1000),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs (docs/decisions.md, issue 20 precision).
        backbone=BackboneConfig(name="dino_vits8", dtype="auto"),
        maskdistill=MaskDistillConfig(name=NameConfig(num_clusters=20), distil=DistilConfig(student="deeplab")),
        train=TrainConfig(output_dir="runs/maskdistill_voc", checkpoint_every=1000, val_every=5000, log_every=20),
        eval=EvalConfig(num_overlays=8),
    )


if __name__ == "__main__":
    raise SystemExit(run_maskdistill_recipe(config))
