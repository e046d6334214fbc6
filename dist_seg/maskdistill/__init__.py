"""MaskDistill (SPEC §8): a bottom-up pipeline of offline stages around two trained models.

mine (:mod:`.mining`) → name (:mod:`.naming`) → detect (:mod:`.detect`: Mask R-CNN trained under the
project's trainer as method ``maskrcnn``, then candidates predicted for every training image) → pseudo
(:mod:`.pseudo`: pseudo-label shards) → distil (method ``maskdistill``: DeepLab-v3 or a head on cached
features) → eval. Each stage is a plain function and a ``dist-seg`` subcommand; its configuration is the
``maskdistill`` section of :class:`dist_seg.config.RunConfig` (:mod:`.config`).

Files a stage writes, under ``maskdistill.work_dir`` (default ``<data.root>/maskdistill``):

* ``masks_<split>.json``: COCO-style ``{"info", "images", "annotations", "categories"}``; one image entry
  per record (``id`` = the record's global sample index, ``key``, ``width``, ``height``), one annotation
  per mined object mask (``segmentation`` = pycocotools RLE with ``counts`` as str, ``bbox`` = [x, y, w, h],
  ``area``, ``image_id``). ``name`` adds ``cluster`` (0..K−1) and sets ``category_id = cluster + 1``.
* ``candidates_<split>.json``: ``{"info": {...}, "candidates": [...]}``; ``candidates`` is the COCO results
  list ``[{"image_id", "category_id" (1..K), "score", "bbox" [x, y, w, h], "segmentation" (RLE at the
  image's size, counts as str)}]`` predicted by the trained Mask R-CNN for every image of the split, ordered
  by ``image_id`` and, within an image, by decreasing score; ``info`` holds ``format``
  (``"dist_seg-candidates-v1"``), ``stage``, ``checkpoint``, ``step``, ``split``, ``data_root``, the
  prediction settings (``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``mask_thresh``,
  ``test_min_size``, ``max_size``, ``rpn_post_nms_top_n_test``), ``num_images``, ``num_candidates``,
  ``world_size`` and ``complete``. Read it with :func:`dist_seg.maskdistill.detect.read_candidates`
  (``-> (info, candidates)``; a bare results list is accepted too).
* pseudo-label shards: an ordinary prepared dataset (``manifest.json`` + shards) whose label slot holds
  the pseudo-labels (0 = background, 1..K = cluster + 1), read by the distil stage like any dataset.

Every JSON is written atomically (temporary file + rename) and carries its provenance in ``info``.
This package sits below ``trainer.py``: it never imports the trainer.
"""
