"""The per-image budget every model of a server applies: one place that reads it from the parameters.

``max_embed_tokens``, ``max_pixels`` and ``min_pixels`` (config.pbtxt parameters, ``MM_<NAME>`` environment
overrides as for every knob; 0 = what the checkpoint's image processor allows) are combined with the
checkpoint's own preprocessing geometry by :meth:`ImageGeometry.with_budget`. The encoder, the language
model and the monolithic baseline resolve the same values from the same sources, so all three preprocess
an image to the same pixels and agree on the largest embedding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from mm_models.geometry import ImageGeometry
from mm_params import Params

BUDGET_PARAMETERS = ("max_embed_tokens", "max_pixels", "min_pixels")


def budget_parameter(params: Mapping[str, str], name: str, env: Mapping[str, str] = os.environ) -> int:
    """One budget knob as an int >= 0 (0 = the checkpoint's); ParamError naming it when malformed."""
    return Params(params, env).int(name, 0, low=0)


def resolve_image_geometry(
    checkpoint: str | Path, params: Mapping[str, str], env: Mapping[str, str] = os.environ
) -> ImageGeometry:
    """The checkpoint's geometry under this server's budget (see the module docstring)."""
    values = {name: budget_parameter(params, name, env) for name in BUDGET_PARAMETERS}
    try:
        return ImageGeometry.from_model_dir(checkpoint).with_budget(
            max_tokens=values["max_embed_tokens"], max_pixels=values["max_pixels"], min_pixels=values["min_pixels"]
        )
    except ValueError as exc:
        raise ValueError(f"image budget {values}: {exc}") from None


class ResizedImagesCounter:
    """``mm_images_resized_total{model,instance}``: images shrunk to fit the budget (not only rounded)."""

    def __init__(self, pb_utils: Any, model: str, instance: str) -> None:
        mf = pb_utils.MetricFamily
        self._family = mf(
            name="mm_images_resized_total",
            kind=mf.COUNTER,
            description="Images downscaled to the per-image budget (max_pixels / max_embed_tokens)",
        )
        self._metric = self._family.Metric(labels={"model": model, "instance": instance})

    def __call__(self, n: int) -> None:
        self._metric.increment(n)
