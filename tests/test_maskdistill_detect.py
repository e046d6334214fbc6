"""Mask R-CNN of the detect stage (SPEC §8.3): self-supervised ResNet-50 init, model, errors."""

from __future__ import annotations

import pytest
import torch

from dist_seg.maskdistill.detect import DetectError, build_maskrcnn, load_ssl_resnet50


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """A random torchvision ResNet-50 with non-trivial BN statistics (so buffers are checked too)."""
    from torchvision.models import resnet50

    with torch.device("meta"):  # shapes only: random values are all the test needs, and much faster than init
        shapes = {k: (v.shape, v.dtype) for k, v in resnet50(weights=None).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    return {k: torch.zeros(shape, dtype=dtype) if dtype == torch.int64 else torch.rand(shape, generator=gen) + 0.5
            for k, (shape, dtype) in shapes.items()}


def _trunk(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def _moco_v2(state):
    keys = {f"module.encoder_q.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    keys.update({"module.encoder_q.fc.0.weight": torch.zeros(2048, 2048), "module.encoder_q.fc.2.weight":
                 torch.zeros(128, 2048), "module.queue": torch.zeros(128, 16)})
    keys.update({f"module.encoder_k.{k}": torch.zeros(1) for k in list(state)[:5]})  # the key encoder is dropped
    return {"epoch": 800, "arch": "resnet50", "state_dict": keys}


def _moco_v3(state):
    keys = {f"module.base_encoder.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    keys.update({"module.base_encoder.fc.0.weight": torch.zeros(4096, 2048), "module.predictor.0.weight":
                 torch.zeros(4096, 256)})
    keys.update({f"module.momentum_encoder.{k}": torch.zeros(1) for k in list(state)[:5]})
    return {"epoch": 300, "state_dict": keys}


def _dino(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _dino_with_fc_in_model(state):
    return {"model": dict(state)}


@pytest.mark.parametrize("make", [_moco_v2, _moco_v3, _dino, _dino_with_fc_in_model])
def test_ssl_resnet50_files_load_to_torchvision_keys(make, resnet_state, tmp_path):
    path = tmp_path / "ssl.pth"
    torch.save(make(resnet_state), path)
    loaded = load_ssl_resnet50(path)
    want = _trunk(resnet_state)
    assert sorted(loaded) == sorted(want), "keys must be torchvision's ResNet-50 trunk, nothing else"
    for key, value in want.items():
        assert torch.equal(loaded[key], value), f"{make.__name__}: {key} differs"


def test_foreign_or_unreadable_files_give_one_line_errors(resnet_state, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    vit = tmp_path / "vit.pth"
    torch.save({"pos_embed": torch.zeros(1, 5, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}, vit)
    shapes = tmp_path / "resnet18ish.pth"
    bad = _dino(resnet_state)
    bad["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(bad, shapes)
    for path, words in ((tmp_path / "missing.pth", "not found"), (junk, "not a readable"),
                        (vit, "not a ResNet-50 checkpoint"), (shapes, "wrong shape")):
        with pytest.raises(DetectError) as err:
            load_ssl_resnet50(path)
        message = str(err.value)
        assert words in message and str(path) in message and "\n" not in message, message
        assert "MoCo" in message, "the message says what was expected"


def test_missing_weights_name_the_fix():
    with pytest.raises(DetectError) as err:
        build_maskrcnn(3, init="ssl", weights=None)
    assert "maskdistill.detect.weights=" in str(err.value) and "maskdistill.detect.init=random" in str(err.value)
    with pytest.raises(DetectError, match="init=random"):
        build_maskrcnn(3, init="random", weights="/some/file.pth")


def test_maskrcnn_gets_the_ssl_backbone_and_spec_settings(resnet_state, tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(_dino(resnet_state), path)
    model = build_maskrcnn(4, init="ssl", weights=path, min_size=64, max_size=96)
    body = model.backbone.body.state_dict()
    for key, value in _trunk(resnet_state).items():
        assert torch.equal(body[key], value), f"backbone {key} not initialised from the file"
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    trainable = {name.split(".")[0] for name, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}, trainable
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == (
        0.05, 0.5, 100)
    # Test time: the model resizes to min_size itself and returns masks at the input's size.
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70)])[0]
    assert out["masks"].shape[-2:] == (50, 70) and out["boxes"].shape[1] == 4
