"""Applying a trained model to images: one image, a folder, a dataset's shards, many GPUs, a Ray cluster.

Modules, from the model outwards:

* :mod:`~dist_seg.predict.bands`: label maps in bands of rows (memory bounded by the image, not by
  ``C x H x W``) and the sliding-window tiling with its blend window;
* :mod:`~dist_seg.predict.engine`: :class:`Predictor`, a checkpoint ready to segment (batched encoding in
  the backbone's dtype, band-wise and tiled label maps), and the whole-image reference :func:`predict_image`;
* :mod:`~dist_seg.predict.inputs`: folders, list files and shards as items, decoded in DataLoader workers;
* :mod:`~dist_seg.predict.writers`: atomic label PNGs (uint8/uint16), overlays, class-area CSVs;
* :mod:`~dist_seg.predict.runner`: the loop over many images, split across ranks, resumable, scored;
* :mod:`~dist_seg.predict.ray_data`: the same prediction as a Ray Data pipeline;
* :mod:`~dist_seg.predict.command`: ``dist-seg predict``.

The MLflow model (:mod:`dist_seg.serving`) and ``dist-seg predict`` both call :class:`Predictor`.
"""

from dist_seg.predict.command import configure_parser, run
from dist_seg.predict.engine import Predictor, model_input_size, predict_image
from dist_seg.predict.inputs import IMAGE_SUFFIXES, list_images

__all__ = ["IMAGE_SUFFIXES", "Predictor", "configure_parser", "list_images", "model_input_size", "predict_image", "run"]
