"""Dense CRF refinement (Krähenbühl & Koltun) of soft segmentations, as in STEGO's evaluation (SPEC §6).

``dense_crf`` refines one image; ``CRFPool`` spreads many images over worker processes and never
hangs: a failed or stuck worker shuts the whole pool down and raises :class:`CRFError`.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pydensecrf.densecrf as dcrf
import torch
import torch.nn.functional as F
from pydensecrf.utils import unary_from_softmax

__all__ = ["CRF_PARAMS", "CRFError", "CRFPool", "CRFTimeoutError", "dense_crf"]

# STEGO's settings (SPEC §6): 10 mean-field iterations, a small smoothness kernel and a wide
# appearance kernel.
CRF_PARAMS = {
    "num_iterations": 10,
    "gaussian_sxy": 1,
    "gaussian_compat": 3,
    "bilateral_sxy": 67,
    "bilateral_srgb": 3,
    "bilateral_compat": 4,
}


class CRFError(RuntimeError):
    """A dense CRF task failed; the pool that ran it has been shut down."""


class CRFTimeoutError(CRFError, TimeoutError):
    """No CRF result arrived within the pool's timeout; its workers were terminated."""


def _to_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def dense_crf(image_uint8_hwc: Any, logits_khw: Any) -> np.ndarray:
    """Refine a soft segmentation of one image with a fully connected CRF.

    ``logits_khw`` are unnormalised log-probabilities: the CRF starts from ``softmax(logits)`` over
    the class axis. STEGO passes ``log_softmax(2 * scores)`` of the cluster probe (``scores`` the
    cosine similarities to the centroids), i.e. the CRF starts from ``softmax(2 * scores)``; passing
    ``2 * scores`` directly gives the same result at full resolution. Logits smaller than the image
    are first upsampled bilinearly (``align_corners=False``) in log space, as STEGO does, so at low
    resolution the two forms differ slightly: pass ``log_softmax`` values for parity.

    The image is given in RGB and handed to pydensecrf in BGR order, as STEGO does: the
    permutohedral lattice is not invariant to channel order.

    Args:
        image_uint8_hwc: ``[H, W, 3]`` uint8 RGB image (un-normalised), array or tensor.
        logits_khw: ``[K, h, w]`` float log-probabilities or scores, ``h <= H`` and ``w <= W``.

    Returns:
        ``[K, H, W]`` float32 array of CRF marginals (each pixel sums to 1).

    Raises:
        ValueError: when the image is not uint8 ``[H, W, 3]`` or the logits are not ``[K, h, w]``.
    """
    image = _to_numpy(image_uint8_hwc)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"dense_crf needs an un-normalised uint8 RGB image [H, W, 3], got dtype {image.dtype} shape "
            f"{image.shape}; undo the normalisation and convert with (x * 255).round().to(torch.uint8)"
        )
    logits = torch.as_tensor(_to_numpy(logits_khw)).float()
    if logits.ndim != 3:
        raise ValueError(f"dense_crf needs logits [K, h, w], got shape {tuple(logits.shape)}")
    height, width = image.shape[:2]
    num_classes = logits.shape[0]
    if logits.shape[1:] != (height, width):
        logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(logits, dim=0).numpy()

    # pydensecrf's C++ side reads raw buffers: both arrays must be C-contiguous.
    unary = np.ascontiguousarray(unary_from_softmax(probs))
    bgr = np.ascontiguousarray(image[:, :, ::-1])

    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=CRF_PARAMS["gaussian_sxy"], compat=CRF_PARAMS["gaussian_compat"])
    crf.addPairwiseBilateral(
        sxy=CRF_PARAMS["bilateral_sxy"],
        srgb=CRF_PARAMS["bilateral_srgb"],
        rgbim=bgr,
        compat=CRF_PARAMS["bilateral_compat"],
    )
    marginals = crf.inference(CRF_PARAMS["num_iterations"])
    return np.asarray(marginals, dtype=np.float32).reshape(num_classes, height, width)


def _init_worker() -> None:
    # Each worker handles one image at a time; intra-op threads would only oversubscribe the cores.
    torch.set_num_threads(1)


def _default_context() -> str:
    # Never "fork": the parent may hold CUDA state or running threads (data loaders, MLflow), which
    # a forked child inherits in an undefined state. A fork server starts clean, once.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class CRFPool:
    """Runs :func:`dense_crf` over many images in worker processes.

    Use as a context manager. With ``num_workers <= 1`` everything runs serially in this process
    (no timeout applies there). A task that raises, a worker that dies, or no result arriving for
    ``timeout_s`` seconds cancels the pending tasks, terminates the workers and raises
    :class:`CRFError` (:class:`CRFTimeoutError` for the timeout); the pool cannot be used after that.

    Args:
        num_workers: worker processes; ``<= 1`` means serial, in-process.
        timeout_s: the longest wait for the next result before the pool is declared stuck. It also
            covers starting the workers (a few seconds: they import torch and pydensecrf).
        mp_context: multiprocessing start method, ``"forkserver"`` (default where available) or
            ``"spawn"``; ``"fork"`` is refused because it is unsafe with torch and threads.

    Example:
        >>> with CRFPool(4) as pool:
        ...     refined = pool.map(images, logits)
    """

    def __init__(self, num_workers: int, timeout_s: float = 120.0, *, mp_context: str | None = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        method = mp_context or _default_context()
        if method == "fork":
            raise ValueError("CRFPool refuses the 'fork' start method (unsafe with torch); use 'forkserver' or 'spawn'")
        self.num_workers = int(num_workers)
        self.timeout_s = float(timeout_s)
        self.mp_context = method
        self._executor: cf.ProcessPoolExecutor | None = None
        self._closed = False

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self._closed:
            raise CRFError("this CRFPool was shut down (closed, or after a failure); create a new CRFPool")
        if self._executor is None:
            self._executor = cf.ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=multiprocessing.get_context(self.mp_context),
                initializer=_init_worker,
            )
        return self._executor

    def map(self, images: Iterable[Any], logits: Iterable[Any]) -> list[np.ndarray]:
        """Apply :func:`dense_crf` to each (image, logits) pair, keeping the input order.

        Args:
            images: ``N`` uint8 RGB images ``[H, W, 3]`` (a list, or an array/tensor ``[N, H, W, 3]``).
            logits: ``N`` logits ``[K, h, w]`` (a list, or an array/tensor ``[N, K, h, w]``).

        Returns:
            ``N`` float32 arrays ``[K, H, W]``.

        Raises:
            CRFError: a task failed (the cause is chained); CRFTimeoutError: the pool got stuck.
        """
        # Plain arrays travel to workers by pickling; torch tensors would go through shared-memory
        # file descriptors, which a terminated worker can leak.
        image_list: Sequence[np.ndarray] = [_to_numpy(x) for x in images]
        logit_list: Sequence[np.ndarray] = [_to_numpy(x) for x in logits]
        if len(image_list) != len(logit_list):
            raise ValueError(f"got {len(image_list)} images but {len(logit_list)} logit maps")
        if self.num_workers <= 1:
            if self._closed:
                raise CRFError("this CRFPool was shut down; create a new CRFPool")
            results = []
            for index, (image, logit) in enumerate(zip(image_list, logit_list)):
                try:
                    results.append(dense_crf(image, logit))
                except Exception as exc:
                    raise CRFError(f"dense CRF failed on item {index}: {exc}") from exc
            return results

        executor = self._pool()
        futures: dict[cf.Future, int] = {}
        try:
            for index, (image, logit) in enumerate(zip(image_list, logit_list)):
                futures[executor.submit(dense_crf, image, logit)] = index
            results: list[np.ndarray | None] = [None] * len(futures)
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, timeout=self.timeout_s, return_when=cf.FIRST_COMPLETED)
                if not done:
                    raise CRFTimeoutError(
                        f"no dense CRF result within {self.timeout_s:.1f}s ({len(pending)} tasks left); "
                        "workers were terminated. Raise timeout_s for large images or many classes"
                    )
                for future in done:
                    index = futures[future]
                    error = future.exception()
                    if error is not None:
                        raise CRFError(f"dense CRF failed on item {index}: {error!r}") from error
                    results[index] = future.result()
            return results  # type: ignore[return-value]
        except BaseException:
            # Any failure, including KeyboardInterrupt, must not leave workers running.
            for future in futures:
                future.cancel()
            self._abort()
            raise

    def close(self) -> None:
        """Finish queued work and release the workers (idempotent)."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _abort(self) -> None:
        """Cancel pending tasks and terminate the workers without waiting for them."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # shutdown() drops its reference to the worker processes, so take them first.
        processes = list((getattr(executor, "_processes", None) or {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=2.0)
            if process.is_alive():
                process.kill()
                process.join(timeout=2.0)
