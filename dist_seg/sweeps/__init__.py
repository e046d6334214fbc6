"""Sweeps: the sweep file (:mod:`.spec`) and its MLflow bookkeeping (:mod:`.runs`); Ray Tune is :mod:`dist_seg.tune`."""
