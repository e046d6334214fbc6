"""STEGO on the built-in toy dataset: the recipe behind `dist-seg demo` and the CPU tests.

    dist-seg prepare toy --out data/toy
    accelerate launch recipes/stego_toy.py [key=value ...]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/stego_toy.py
"""

from dist_seg.config import BackboneConfig, DataConfig, EvalConfig, RunConfig, StegoConfig, TrainConfig
from dist_seg.trainer import run_recipe


def config() -> RunConfig:
    return RunConfig(
        method="stego",
        data=DataConfig(dataset="toy", root="data/toy", res=64, eval_res=64, batch_size=32, num_workers=2,
                        shuffle_buffer=64),
        backbone=BackboneConfig(name="toy"),
        stego=StegoConfig(
            dim=32, feature_samples=8, neg_samples=3, num_neighbors=5,
            pos_intra_weight=1.0, pos_intra_shift=0.18,
            pos_inter_weight=0.5, pos_inter_shift=0.12,
            neg_inter_weight=1.0, neg_inter_shift=0.46,
            zero_clamp=True, pointwise=True,
        ),
        train=TrainConfig(num_steps=300, output_dir="runs/stego_toy", val_every=100, checkpoint_every=100,
                          log_every=10),
        eval=EvalConfig(num_overlays=6),
    )


if __name__ == "__main__":
    raise SystemExit(run_recipe(config))
