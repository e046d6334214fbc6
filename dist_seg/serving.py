"""The MLflow model of a training run: a models-from-code pyfunc over the run's safe checkpoint.

MLflow loads this file as code (``mlflow.pyfunc.log_model(python_model="dist_seg/serving.py", ...)``), so
the logged model holds no pickle: its artifacts are the checkpoint (read with
``torch.load(weights_only=True)`` through :class:`dist_seg.predict.Predictor`; a checkpoint that would run
code is refused) and, when the run used a local file, the backbone weights. :class:`dist_seg.tracking.Tracker`
logs it when a run finishes.

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")   # or models:/<name>/<version>
    labels = model.predict(images)          # uint8 [N, H, W, 3] RGB -> int64 [N, H, W] class ids

``predict`` returns exactly ``dist-seg predict``'s label maps (255: a cluster matched to no class). All images
of one call must share a size (a tensor); call it per image for mixed sizes. Serving:
``mlflow models serve -m runs:/<run id>/model --env-manager local -p 5000`` (in an environment with
dist_seg installed), then POST ``{"inputs": <nested list [N, H, W, 3]>}`` to ``/invocations``.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


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
        if isinstance(model_input, dict) and len(model_input) == 1:  # a named input ({"images": ...})
            model_input = next(iter(model_input.values()))
        images = np.asarray(model_input)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 RGB images [N, H, W, 3], got shape {images.shape}")
        images = images.astype(np.uint8, copy=False)
        return np.stack([self.predictor(np.ascontiguousarray(image)) for image in images])


mlflow.models.set_model(SegmentationModel())
