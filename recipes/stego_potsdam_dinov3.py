"""STEGO on Potsdam-3 with DINOv3's satellite ViT-L/16 (SAT-493M) backbone (issue 26; SPEC §1, §3).

    dist-seg prepare potsdam3 --src /data/potsdam --out data/potsdam3
    accelerate launch recipes/stego_potsdam_dinov3.py backbone.weights=/path/dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth

The backbone name carries the SAT-493M input normalisation (mean 0.430/0.411/0.296, std 0.213/0.156/0.143),
so nothing here can pair these weights with ImageNet statistics. Feature grid: recipes/stego_potsdam.py
trains ViT-S/8 on 224-px crops, a 28x28 grid; at patch 16 that grid needs 448-px crops (448 / 16 = 28),
and evaluation runs at 640 px (40x40, the grid of the 320-px evaluation at patch 8). Potsdam's tiles are
smaller than that and are upsampled, as STEGO's are to 224 and 320. Loss settings are paper 002's
ViT-S/8 values for Potsdam; re-tune them for this backbone before reading anything into the numbers.
"""

from dist_seg.config import BackboneConfig, DataConfig, RunConfig, StegoConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="stego",
        num_classes=3,
        data=DataConfig(dataset="potsdam3", root="data/potsdam3", res=448, eval_res=640, batch_size=16),
        # Frozen backbone in bf16 autocast on GPUs, float32 on CPUs.
        backbone=BackboneConfig(name="dinov3_vitl16_sat", dtype="auto"),
        stego=StegoConfig(
            dim=70, zero_clamp=True, pointwise=True,
            neg_inter_weight=0.63, pos_inter_weight=0.25, pos_intra_weight=0.67,
            neg_inter_shift=0.76, pos_inter_shift=0.02, pos_intra_shift=0.08,
        ),
        train=TrainConfig(num_steps=5000, output_dir="runs/stego_potsdam_dinov3", val_every=500,
                          checkpoint_every=500),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
