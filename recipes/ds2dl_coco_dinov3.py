"""DS²DL on COCO-Stuff-27 with a DINOv3 ViT-B/16 backbone (issue 26; SPEC §1, §4).

    dist-seg prepare cocostuff27 --src /data/coco --out data/cocostuff27
    accelerate launch recipes/ds2dl_coco_dinov3.py backbone.weights=/path/dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth

Feature grid: DS²DL's recipe (recipes/ds2dl_coco.py) trains ViT-S/8 on 224-px crops, a 28x28 grid. DINOv3's
patch is 16 px, so this recipe trains on 448-px crops (448 / 16 = 28) and evaluates at 640 px (40x40, the
grid of the 320-px evaluation at patch 8). The other settings are those of recipes/ds2dl_coco.py; r and
tau sit against the backbone's feature-similarity statistics, so re-tune them for DINOv3 first.
"""

from dist_seg.config import BackboneConfig, DataConfig, DS2DLConfig, RunConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="ds2dl",
        num_classes=27,
        data=DataConfig(dataset="cocostuff27", root="data/cocostuff27", res=448, eval_res=640, batch_size=32),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs; ImageNet normalisation comes with the name.
        backbone=BackboneConfig(name="dinov3_vitb16", dtype="auto"),
        ds2dl=DS2DLConfig(dim=64, r=2.1, tau=0.1, optimizer="radam", lr=1e-4, prototype_lr=5e-4,
                          bias_init=-0.5, bias_lr=5e-4, affinity_target="backbone", spatial_center=True),
        train=TrainConfig(num_steps=15000, seed=123456, output_dir="runs/ds2dl_coco_dinov3", val_every=1000,
                          checkpoint_every=500),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
