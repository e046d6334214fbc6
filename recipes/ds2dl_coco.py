"""DS²DL on cocostuff27 (SPEC §4 recipe; paper 004).

    dist-seg prepare cocostuff27 --src /data/... --out data/cocostuff27
    accelerate launch recipes/ds2dl_coco.py [--config extra.yaml] [key=value ...]
"""

from dist_seg.config import BackboneConfig, DataConfig, DS2DLConfig, RunConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="ds2dl",
        num_classes=27,
        data=DataConfig(dataset="cocostuff27", root="data/cocostuff27", res=224, batch_size=32),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs (docs/decisions.md, issue 20 precision).
        backbone=BackboneConfig(name="dino_vits8", dtype="auto"),
        # SPEC §4: r = 2.1 for COCO and 2.22 for Cityscapes is our reading of the paper.
        ds2dl=DS2DLConfig(dim=64, r=2.1, tau=0.1, optimizer="radam", lr=1e-4, prototype_lr=5e-4,
                          bias_init=-0.5, bias_lr=5e-4, affinity_target="backbone", spatial_center=True),
        train=TrainConfig(num_steps=15000, seed=123456, output_dir="runs/ds2dl_coco", val_every=1000,
                          checkpoint_every=500),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
