"""Training methods. ``cfg.method`` names a module ``dist_seg.methods.<name>`` holding a
:class:`~dist_seg.methods.base.Method` subclass whose ``name`` is that same string."""

from __future__ import annotations

import importlib

from dist_seg.config import RunConfig
from dist_seg.methods.base import Batch, Method, StepContext

__all__ = ["Batch", "Method", "StepContext", "build_method", "method_class"]


def method_class(name: str) -> type[Method]:
    """The :class:`Method` subclass registered under ``name`` (e.g. ``"stego"``)."""
    try:
        module = importlib.import_module(f"dist_seg.methods.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"dist_seg.methods.{name}":
            raise ValueError(f"unknown method {name!r}: there is no module dist_seg.methods.{name}") from None
        raise
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Method) and value is not Method and value.name == name:
            return value
    raise ValueError(f"dist_seg.methods.{name} defines no Method subclass with name={name!r}")


def build_method(cfg: RunConfig, *, feat_dim: int, num_classes: int, has_labels: bool) -> Method:
    """Instantiate the method ``cfg.method`` for features of ``feat_dim`` channels and ``num_classes`` classes."""
    return method_class(cfg.method)(cfg, feat_dim=feat_dim, num_classes=num_classes, has_labels=has_labels)
