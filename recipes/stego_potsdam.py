"""STEGO on Potsdam-3 (paper 002 Table 1; SPEC §3). No five-crop.

    dist-seg prepare potsdam3 --src /data/potsdam --out data/potsdam3
    accelerate launch recipes/stego_potsdam.py [key=value ...]
"""

from dist_seg.config import BackboneConfig, DataConfig, RunConfig, StegoConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="stego",
        num_classes=3,
        data=DataConfig(dataset="potsdam3", root="data/potsdam3", res=224, batch_size=16),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs (docs/decisions.md, issue 20 precision).
        backbone=BackboneConfig(name="dino_vits8", dtype="auto"),
        stego=StegoConfig(
            dim=70, zero_clamp=True, pointwise=True,
            neg_inter_weight=0.63, pos_inter_weight=0.25, pos_intra_weight=0.67,
            neg_inter_shift=0.76, pos_inter_shift=0.02, pos_intra_shift=0.08,
        ),
        train=TrainConfig(num_steps=5000, output_dir="runs/stego_potsdam", val_every=500, checkpoint_every=500),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
