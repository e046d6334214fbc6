"""STEGO on COCO-Stuff-27 (paper 002 Table 1, "actual configuration"; SPEC §3).

    dist-seg prepare cocostuff27 --src /data/coco --out data/cocostuff27
    accelerate launch recipes/stego_coco.py [--config extra.yaml] [key=value ...]
"""

from dist_seg.config import BackboneConfig, DataConfig, RunConfig, StegoConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="stego",
        num_classes=27,
        data=DataConfig(dataset="cocostuff27", root="data/cocostuff27", res=224, batch_size=32),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs (docs/decisions.md, issue 20 precision).
        backbone=BackboneConfig(name="dino_vitb8", dtype="auto"),
        stego=StegoConfig(
            dim=90, zero_clamp=True, pointwise=True,
            neg_inter_weight=0.15, pos_inter_weight=1.00, pos_intra_weight=0.10,
            neg_inter_shift=1.00, pos_inter_shift=0.20, pos_intra_shift=0.12,
        ),
        train=TrainConfig(num_steps=7000, output_dir="runs/stego_coco", val_every=500, checkpoint_every=500),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
