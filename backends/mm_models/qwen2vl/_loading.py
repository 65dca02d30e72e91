"""Loading one side of a Qwen2-VL checkpoint without materialising the other side's weights.

transformers 5 builds the model on the meta device inside ``from_pretrained`` and only then loads the
checkpoint tensors. The two subclasses below delete the unneeded submodules in ``__init__`` (while they
are still meta tensors, so they never take memory) and mark the matching checkpoint keys as expected-
unexpected, so those tensors are skipped when loading. Everything else (key renaming of older
checkpoint layouts, dtype handling, M-RoPE position logic, ``generate``) is the stock
``Qwen2VLForConditionalGeneration``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import _hf
from ..geometry import ImageGeometry

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2_vl",)


def _base_class() -> type:
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


def _check_model_type(path: Path) -> None:
    cfg = _hf.read_json(path / _hf.CONFIG_FILE)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} in {str(path)!r}; supported: {SUPPORTED_MODEL_TYPES}")


def _register_conversions(cls: type, base: type) -> None:
    """Give ``cls`` the checkpoint key conversions registered for ``base``.

    transformers 5 saves Qwen2-VL in the released layout (``visual.*``, ``model.layers.*``) and renames
    keys on load through conversions looked up by class name; a subclass must be registered too, or
    its weights would silently stay randomly initialised.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers: renaming is attribute-based and inherited
        return
    mapping = get_checkpoint_conversion_mapping(base.__name__)
    if mapping is not None:
        register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


@functools.cache
def _vision_only_class() -> type:
    base = _base_class()

    class Qwen2VLVisionOnly(base):  # type: ignore[misc, valid-type]
        """Qwen2-VL without ``model.language_model`` and ``lm_head`` (encoder side)."""

        _keys_to_ignore_on_load_unexpected = [r"^model\.language_model\.", r"^lm_head\."]
        _tied_weights_keys: dict[str, str] = {}

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            del self.model.language_model
            del self.lm_head

        def get_output_embeddings(self) -> None:  # no LM head on this side
            return None

    _register_conversions(Qwen2VLVisionOnly, base)
    return Qwen2VLVisionOnly


@functools.cache
def _language_only_class() -> type:
    base = _base_class()

    class Qwen2VLLanguageOnly(base):  # type: ignore[misc, valid-type]
        """Qwen2-VL without ``model.visual`` (language side); images arrive as embeddings."""

        _keys_to_ignore_on_load_unexpected = [r"^model\.visual\."]

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            del self.model.visual

    _register_conversions(Qwen2VLLanguageOnly, base)
    return Qwen2VLLanguageOnly


def load_model(path: str | Path, part: str, device: Any = "cpu", dtype: Any = None) -> Any:
    """Load ``part`` ("vision", "language" or "full") of the checkpoint in ``path``, in eval mode.

    ``dtype`` None keeps the checkpoint's dtype. Raises ValueError on a missing/unsupported checkpoint.
    """
    import torch

    p = _hf.model_dir(path)
    _check_model_type(p)
    classes: dict[str, Callable[[], Any]] = {
        "vision": _vision_only_class,
        "language": _language_only_class,
        "full": _base_class,
    }
    if part not in classes:
        raise ValueError(f"part must be one of {sorted(classes)}, got {part!r}")
    cls = classes[part]()
    model, info = cls.from_pretrained(
        p, dtype=_hf.resolve_dtype(dtype), local_files_only=True, output_loading_info=True
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(
            f"checkpoint {str(p)!r} lacks {len(missing)} weights of the {part} side, e.g. "
            f"{missing[:3]}; refusing to run with randomly initialised weights"
        )
    model = model.to(torch.device(device)).eval()
    logger.info(
        "loaded %s side of %s: %d parameters, dtype %s, device %s",
        part,
        p,
        sum(t.numel() for t in model.parameters()),
        model.dtype,
        device,
    )
    return model


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_hf.model_dir(path), local_files_only=True)


def load_image_processor(path: str | Path, geometry: ImageGeometry | None = None) -> Any:
    """The checkpoint's Qwen2-VL image processor, always the PIL backend.

    The PIL backend needs no torchvision and gives the same pixels on every machine; both sides of the
    split and the oracle use it, so their inputs are identical. ``geometry`` (a serving budget from
    :meth:`ImageGeometry.with_budget`) overrides the processor's min/max pixels, so larger images are
    resized to the budget by the processor itself; None keeps the checkpoint's own bounds.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kwargs = geometry.processor_kwargs() if geometry is not None else {}
    return Qwen2VLImageProcessorPil.from_pretrained(_hf.model_dir(path), local_files_only=True, **kwargs)
