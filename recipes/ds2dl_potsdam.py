"""DS²DL on potsdam3 (SPEC §4 recipe; paper 004).

    dist-seg prepare potsdam3 --src /data/... --out data/potsdam3
    accelerate launch recipes/ds2dl_potsdam.py [--config extra.yaml] [key=value ...]
"""

from dist_seg.config import BackboneConfig, DataConfig, DS2DLConfig, RunConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="ds2dl",
        num_classes=3,
        data=DataConfig(dataset="potsdam3", root="data/potsdam3", res=224, batch_size=32),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs (docs/decisions.md, issue 20 precision).
        backbone=BackboneConfig(name="dino_vitb8", dtype="auto"),
        ds2dl=DS2DLConfig(dim=64, r=6.0, tau=0.1, optimizer="adam", lr=1e-4, prototype_lr=5e-4,
                          bias_init=-0.5, bias_lr=5e-4, affinity_target="backbone", spatial_center=True),
        train=TrainConfig(num_steps=4000, seed=0, output_dir="runs/ds2dl_potsdam", val_every=1000,
                          checkpoint_every=500),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
