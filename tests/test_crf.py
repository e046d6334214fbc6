"""Dense CRF (SPEC §6) and the worker pool that runs it."""

from __future__ import annotations

import time

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax

from dist_seg.eval.crf import CRFError, CRFPool, CRFTimeoutError, dense_crf


def _two_region_image(size: int = 64, edge: int = 32, seed: int = 0):
    """Dark left half, bright right half, sharp vertical edge, mild noise; labels 0 | 1."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), dtype=np.int64)
    image[:, :edge] = (40, 60, 50)
    image[:, edge:] = (200, 180, 190)
    image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((size, size), dtype=np.int64)
    truth[:, edge:] = 1
    return image, truth


def _random_inputs(seed: int, size: int = 48, num_classes: int = 4, low_res: int = 12):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    logits = torch.from_numpy(rng.normal(size=(num_classes, low_res, low_res)).astype(np.float32))
    return image, logits


def _reference_crf_on_bgr(image_rgb: np.ndarray, logits_full: np.ndarray) -> np.ndarray:
    """pydensecrf called directly with SPEC §6's constants on the BGR image."""
    num_classes, height, width = logits_full.shape
    probs = softmax(logits_full.astype(np.float32), axis=0)
    unary = np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1.0)).reshape(num_classes, -1).astype(np.float32))
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=np.ascontiguousarray(image_rgb[:, :, ::-1]), compat=4)
    return np.asarray(crf.inference(10), dtype=np.float32).reshape(num_classes, height, width)


def test_crf_snaps_a_shifted_blurred_prediction_to_the_edge():
    image, truth = _two_region_image()
    # Low-resolution soft prediction whose boundary sits 10 px right of the true edge, with a soft ramp.
    centres = (np.arange(16) + 0.5) * 4
    ramp = (centres - 42.0) / 6.0
    scores = torch.tensor(np.stack([-ramp, ramp])[:, None, :].repeat(16, axis=1), dtype=torch.float32)
    upsampled = F.interpolate(scores[None], size=truth.shape, mode="bilinear", align_corners=False)[0]
    before = float((upsampled.argmax(0).numpy() == truth).mean())

    refined = dense_crf(image, torch.log_softmax(scores, dim=0))
    after = float((refined.argmax(0) == truth).mean())
    assert refined.shape == (2, 64, 64) and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-4, err_msg="CRF marginals must sum to 1 per pixel")
    assert after > before + 0.08, (
        f"CRF should move the boundary to the image edge: accuracy {before:.3f} -> {after:.3f}"
    )
    assert after > 0.95, f"CRF accuracy on a clean two-region image too low: {after:.3f}"


def test_image_is_handed_to_pydensecrf_in_bgr_order():
    image, logits = _random_inputs(1, low_res=48)  # full resolution: no interpolation involved
    ours = dense_crf(image, logits)
    bgr_reference = _reference_crf_on_bgr(image, logits.numpy())
    # Float32 rounding of the two softmax implementations is amplified a little by 10 iterations.
    np.testing.assert_allclose(ours, bgr_reference, atol=1e-3, err_msg="dense_crf must equal pydensecrf on BGR")
    # Feeding the channels the other way round changes marginals by far more, so the check above can fail.
    rgb_reference = _reference_crf_on_bgr(np.ascontiguousarray(image[:, :, ::-1]), logits.numpy())
    swap = np.abs(rgb_reference - ours).max()
    assert swap > 0.1, f"channel order changed marginals by only {swap:.4f}; the BGR check would be vacuous"


def test_low_resolution_logits_are_upsampled_bilinearly_before_softmax():
    image, logits = _random_inputs(2, size=40, low_res=10)
    full = F.interpolate(logits[None], size=(40, 40), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(dense_crf(image, logits), dense_crf(image, full), atol=1e-6)
    # Adding a per-pixel constant (log_softmax vs raw scores) leaves the CRF unchanged at full resolution.
    np.testing.assert_allclose(dense_crf(image, full), dense_crf(image, torch.log_softmax(full, 0)), atol=1e-4)


def test_dense_crf_rejects_normalised_images():
    image, logits = _random_inputs(3)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(image.astype(np.float32) / 255, logits)
    with pytest.raises(ValueError, match=r"\[K, h, w\]"):
        dense_crf(image, logits[0])


def test_serial_pool_equals_dense_crf_and_wraps_errors():
    inputs = [_random_inputs(seed) for seed in range(3)]
    images, logits = zip(*inputs)
    with CRFPool(1) as pool:
        results = pool.map(images, logits)
        for (image, logit), result in zip(inputs, results):
            np.testing.assert_array_equal(result, dense_crf(image, logit))
        with pytest.raises(CRFError, match="item 1"):
            pool.map([images[0], images[1].astype(np.float32)], logits[:2])


@pytest.mark.timeout(90)
def test_pool_of_two_equals_serial():
    inputs = [_random_inputs(seed, num_classes=3 + seed % 3) for seed in range(6)]
    images, logits = zip(*inputs)
    serial = CRFPool(0).map(images, logits)
    with CRFPool(2) as pool:
        parallel = pool.map(images, logits)
        # array/tensor batches
        stacked = pool.map(np.stack([images[0], images[3]]), torch.stack([logits[0], logits[3]]))
    assert len(parallel) == 6
    for i, (a, b) in enumerate(zip(serial, parallel)):
        np.testing.assert_array_equal(a, b, err_msg=f"pooled result {i} differs from the serial one")
    np.testing.assert_array_equal(stacked[1], serial[3])


@pytest.mark.timeout(90)
def test_worker_exception_propagates_and_shuts_the_pool_down():
    inputs = [_random_inputs(seed) for seed in range(12)]
    images, logits = (list(x) for x in zip(*inputs))
    images[5] = images[5].astype(np.float32)  # fails inside the worker, in dense_crf's validation
    pool = CRFPool(2, timeout_s=60)
    pool.map(images[:2], logits[:2])  # start the workers so timing below measures the failure only
    workers = list(pool._executor._processes.values())
    assert workers and all(p.is_alive() for p in workers)
    start = time.monotonic()
    with pytest.raises(CRFError, match="item 5") as caught:
        pool.map(images, logits)
    elapsed = time.monotonic() - start
    assert isinstance(caught.value.__cause__, ValueError), "the worker's exception must be chained"
    assert elapsed < 20, f"failure took {elapsed:.1f}s to surface"
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in workers), "workers must be stopped after a failure"
    with pytest.raises(CRFError, match="shut down"):
        pool.map(images[:1], logits[:1])


@pytest.mark.timeout(90)
def test_stuck_pool_times_out_and_terminates_workers():
    image, logits = _random_inputs(4)
    big = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    big_logits = torch.randn(27, 64, 64)  # seconds per image on this machine
    pool = CRFPool(2, timeout_s=60)
    pool.map([image, image], [logits, logits])  # workers started
    workers = list(pool._executor._processes.values())
    pool.timeout_s = 0.5
    start = time.monotonic()
    with pytest.raises(CRFTimeoutError):
        pool.map([big] * 4, [big_logits] * 4)
    elapsed = time.monotonic() - start
    assert elapsed < 10, f"timeout of 0.5s took {elapsed:.1f}s to fire"
    for p in workers:
        p.join(timeout=10)
    assert not any(p.is_alive() for p in workers), "busy workers must be terminated on timeout"


def test_fork_start_method_is_refused():
    with pytest.raises(ValueError, match="fork"):
        CRFPool(2, mp_context="fork")
