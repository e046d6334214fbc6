"""The MLflow model of a training run: a models-from-code pyfunc over the run's safe checkpoint.

MLflow loads this file as code (``mlflow.pyfunc.log_model(python_model="dist_seg/serving.py", ...)``), so
the logged model holds no pickle: its artifacts are the checkpoint (read with
``torch.load(weights_only=True)`` through :class:`dist_seg.predict.Predictor`; a checkpoint that would run
code is refused) and, when the run used a local file, the backbone weights. The model also carries the
``dist_seg`` package it was trained with (``code/``) and pins the libraries that package imports, so
``mlflow models serve`` works where only the model's own requirements are installed.
:class:`dist_seg.tracking.Tracker` logs it when a run finishes.

    model = mlflow.pyfunc.load_model("models:/<model id>")   # the run's model_uri tag; or models:/<name>/<version>
    labels = model.predict(image)           # uint8 [H, W, 3] RGB      -> int64 [H, W] class ids
    labels = model.predict(images)          # uint8 [N, H, W, 3]       -> int64 [N, H, W]
    labels = model.predict([im1, im2])      # images of different sizes -> a list of [H_i, W_i]

``predict`` returns exactly ``dist-seg predict``'s label maps (255: a cluster matched to no class), computed
in bands of rows, so large images need memory for the image and its label map only. Serving:
``mlflow models serve -m models:/<model id> -p 5000``, then POST ``{"inputs": <nested list [H, W, 3] or
[N, H, W, 3]>}`` to ``/invocations``.
"""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


def _as_image(array, where: str) -> np.ndarray:
    image = np.asarray(array)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{where}: expected an RGB image [H, W, 3], got an array of shape {image.shape}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.number) or image.min(initial=0) < 0 or image.max(initial=0) > 255:
            raise ValueError(f"{where}: expected uint8 values 0..255, got dtype {image.dtype}")
        image = image.astype(np.uint8)
    # Arrays MLflow parses from a request are read-only; torch wants writable memory (else it warns).
    return np.require(image, requirements=["C", "W"])


with warnings.catch_warnings():
    # MLflow asks for predict's type hints when the class is defined. Its type hints cannot say "an image, a
    # batch array or a list of arrays" (list[...] refuses arrays, Any is refused too), which is what this
    # model takes, so the inputs are checked in predict instead, and the warning is not the user's to see.
    warnings.filterwarnings("ignore", message=".*[Tt]ype hint.*", category=UserWarning)

    class SegmentationModel(PythonModel):
        """pyfunc wrapper of :class:`dist_seg.predict.Predictor`."""

        def load_context(self, context) -> None:
            import torch

            from dist_seg.predict import Predictor

            overrides = []
            if "backbone_weights" in context.artifacts:
                overrides.append(f"backbone.weights={context.artifacts['backbone_weights']}")
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.predictor = Predictor(context.artifacts["checkpoint"], device=device, overrides=overrides)

        def predict(self, context, model_input, params=None):  # noqa: ARG002 - pyfunc's signature
            """Label maps of one image ``[H, W, 3]``, a batch ``[N, H, W, 3]`` or a list of images of any sizes."""
            if isinstance(model_input, dict) and len(model_input) == 1:  # a named input ({"images": ...})
                model_input = next(iter(model_input.values()))
            if isinstance(model_input, (list, tuple)) and model_input and not np.isscalar(model_input[0]):
                shapes = {np.shape(x) for x in model_input}
                if len(shapes) > 1 or len(next(iter(shapes))) != 2:  # images of different sizes, or [N, H, W, 3]
                    return [self.predictor(_as_image(x, f"image {i}")) for i, x in enumerate(model_input)]
            images = np.asarray(model_input)
            if images.ndim == 3:
                return self.predictor(_as_image(images, "image"))
            if images.ndim != 4:
                raise ValueError(f"expected an RGB image [H, W, 3], a batch [N, H, W, 3] or a list of images, got an "
                                 f"array of shape {images.shape}")
            return np.stack([self.predictor(_as_image(image, f"image {i}")) for i, image in enumerate(images)])


mlflow.models.set_model(SegmentationModel())
