"""``data.decode_device``: JPEG bytes from the loader, decoded by torchvision's batched ``decode_jpeg``.

The device path is exercised on the CPU (``decode_jpeg(..., device="cpu")`` through the same function the
trainer calls with ``"cuda"``) and compared with the CPU loader (PIL decode): the geometry (resize of the
minor side, centre crop) is the same function, so pixels may differ only by the decoders' rounding.
"""

from __future__ import annotations

import pytest
import torch

from dist_seg import cli
from dist_seg.data.shards import make_loader
from dist_seg.data.transforms import decode_jpeg_batch
from tests._data_utils import make_dataset

# PIL and libjpeg-turbo/nvJPEG may upsample chroma and run the IDCT differently: a few grey levels.
MEAN_TOLERANCE = 1.5
MAX_TOLERANCE = 24


def _pairs(root, res, decode_a, decode_b):
    a, _ = make_loader(root, "train", batch_size=4, res=res, num_workers=0, shuffle=False, infinite=False,
                       decode=decode_a)
    b, _ = make_loader(root, "train", batch_size=4, res=res, num_workers=0, shuffle=False, infinite=False,
                       decode=decode_b)
    return list(zip(a, b))


@pytest.mark.parametrize("res", [16, 24])
def test_encoded_jpeg_decoded_by_torchvision_matches_the_cpu_loader(tmp_path, res):
    make_dataset(tmp_path, num=10, per_shard=4, image_format="jpg")
    pairs = _pairs(tmp_path, res, "encoded", "image")
    assert len(pairs) == 3
    for encoded, decoded in pairs:
        assert isinstance(encoded["jpeg"], list) and "image" not in encoded, "JPEG records travel undecoded"
        assert torch.equal(encoded["index"], decoded["index"])
        assert torch.equal(encoded["label"], decoded["label"]), "labels are decoded and resized as before"
        images = decode_jpeg_batch(encoded["jpeg"], res, "cpu")
        assert images.shape == decoded["image"].shape and images.dtype == torch.uint8
        diff = (images.int() - decoded["image"].int()).abs().float()
        assert diff.mean() <= MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (diff.mean(), diff.max())


def test_png_records_are_decoded_in_the_loader_in_encoded_mode(tmp_path):
    make_dataset(tmp_path, num=6, per_shard=3, image_format="png")
    for encoded, decoded in _pairs(tmp_path, 16, "encoded", "image"):
        assert "jpeg" not in encoded and torch.equal(encoded["image"], decoded["image"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_decode_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    from dist_seg.data.toy import generate_toy

    generate_toy(tmp_path / "toy", num_train=8, num_val=4, samples_per_shard=4)
    code = cli.main(["train", "stego_toy", f"data.root={tmp_path / 'toy'}", f"train.output_dir={tmp_path / 'run'}",
                     "data.decode_device=cuda", "tracking.enabled=false", "train.num_steps=1"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "data.decode_device=cpu" in err[0], err
