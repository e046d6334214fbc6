"""STEGO on Cityscapes-27 (paper 002 Table 1; SPEC §3).

    dist-seg prepare cityscapes27 --src /data/cityscapes --out data/cityscapes27
    accelerate launch recipes/stego_cityscapes.py [key=value ...]
"""

from dist_seg.config import BackboneConfig, DataConfig, RunConfig, StegoConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="stego",
        num_classes=27,
        data=DataConfig(dataset="cityscapes27", root="data/cityscapes27", res=224, batch_size=32),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs (docs/decisions.md, issue 20 precision).
        backbone=BackboneConfig(name="dino_vitb8", dtype="auto"),
        stego=StegoConfig(
            dim=100, zero_clamp=True, pointwise=False,
            neg_inter_weight=0.91, pos_inter_weight=0.58, pos_intra_weight=1.00,
            neg_inter_shift=0.31, pos_inter_shift=0.18, pos_intra_shift=0.46,
        ),
        train=TrainConfig(num_steps=7000, output_dir="runs/stego_cityscapes", val_every=500, checkpoint_every=500),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
