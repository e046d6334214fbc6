"""STEGO on COCO-Stuff-27 with a DINOv3 ViT-B/16 backbone (issue 26; SPEC §1, §3).

    dist-seg prepare cocostuff27 --src /data/coco --out data/cocostuff27
    accelerate launch recipes/stego_coco_dinov3.py backbone.weights=/path/dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth

Feature grid: STEGO's losses are defined on the grid its ViT-B/8 gives at 224-px crops, 28x28. DINOv3's
patch is 16 px, so this recipe trains on 448-px crops (448 / 16 = 28) and evaluates at 640 px (40x40, the
grid of STEGO's 320-px evaluation at patch 8). The token count, and so the backbone's cost per crop, is
that of ViT-B/8 at 224. The loss weights and shifts are paper 002's ViT-B/8 values: the shifts sit against
the backbone's feature-correlation statistics, so re-tune them for DINOv3 (recipes/sweep.yaml) before
reading anything into the numbers.
"""

from dist_seg.config import BackboneConfig, DataConfig, RunConfig, StegoConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="stego",
        num_classes=27,
        data=DataConfig(dataset="cocostuff27", root="data/cocostuff27", res=448, eval_res=640, batch_size=32),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs; ImageNet normalisation comes with the name.
        backbone=BackboneConfig(name="dinov3_vitb16", dtype="auto"),
        stego=StegoConfig(
            dim=90, zero_clamp=True, pointwise=True,
            neg_inter_weight=0.15, pos_inter_weight=1.00, pos_intra_weight=0.10,
            neg_inter_shift=1.00, pos_inter_shift=0.20, pos_intra_shift=0.12,
        ),
        train=TrainConfig(num_steps=7000, output_dir="runs/stego_coco_dinov3", val_every=500, checkpoint_every=500),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
