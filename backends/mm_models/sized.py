"""Random-weights Qwen2-VL checkpoints with the architecture dimensions of released models.

For realistic-size benchmarks without a model hub: ``build_sized_checkpoint(out, "qwen2-vl-2b")`` writes
an ordinary checkpoint directory (config.json, safetensors, tokenizer, preprocessor_config.json) that
:mod:`mm_models.qwen2vl` loads like any other. Compute, memory and embedding sizes are those of the real
model (hidden widths, depths, heads, vocabulary size, 14-pixel patches, 2x2 merge, 28x28 pixels per
embedding token); the outputs are meaningless (seeded random weights, the tiny checkpoint's locally
trained 1024-entry tokenizer: ids beyond it decode to nothing).

    python -m mm_models.sized --preset qwen2-vl-2b --out /data/qwen2-vl-2b-random            # ~4.4 GB bf16
    python -m mm_models.sized --preset qwen2-vl-7b --out /data/qwen2-vl-7b-random            # ~16 GB bf16
    python -m mm_models.sized --preset qwen2-vl-2b --out /tmp/small --num-layers 2 --vision-depth 2

Dimensions follow the released Qwen2-VL-2B/7B-Instruct ``config.json`` files. Building initialises every
weight on the CPU (minutes for 7B on a few cores, and RAM of the model size in the chosen dtype).
Idempotent: a directory already holding the same preset/overrides/seed/dtype (marker file) is left alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import _hf  # noqa: F401  (offline environment before transformers is imported)
from .prompt import ENDOFTEXT, IM_END, IMAGE_PAD, SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START

logger = logging.getLogger(__name__)

MARKER_FILE = "mm_models_sized.json"
FORMAT_VERSION = 1

#: Image geometry of the released models: 14-pixel patches, 2x2 merge -> 28x28 pixels per token,
#: at most 12845056 pixels = 16384 tokens per image, at least 56x56 pixels = 4 tokens.
IMAGE_PROCESSOR: dict[str, int] = {
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 16384,
}

_VISION_COMMON: dict[str, Any] = {
    "depth": 32,
    "embed_dim": 1280,
    "num_heads": 16,
    "mlp_ratio": 4,
    "hidden_act": "quick_gelu",
    "in_channels": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "initializer_range": 0.02,
}

PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-vl-2b": {
        "text": {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "vocab_size": 151936,
            "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        },
        "vision": {**_VISION_COMMON, "hidden_size": 1536},
        "tie_word_embeddings": True,
    },
    "qwen2-vl-7b": {
        "text": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "vocab_size": 152064,
            "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        },
        "vision": {**_VISION_COMMON, "hidden_size": 3584},
        "tie_word_embeddings": False,
    },
}


def preset_config(preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The preset's {"text": ..., "vision": ..., "tie_word_embeddings": ...} with ``overrides`` applied.

    ``overrides`` keys are "text.<field>", "vision.<field>" or "tie_word_embeddings"; the vision merger
    output (vision.hidden_size) follows text.hidden_size unless overridden itself.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if key == "tie_word_embeddings":
            cfg[key] = bool(value)
        elif section in ("text", "vision") and name:
            cfg[section][name] = value
        else:
            raise ValueError(f"override {key!r}: expected 'text.<field>', 'vision.<field>' or 'tie_word_embeddings'")
    if "text.hidden_size" in (overrides or {}) and "vision.hidden_size" not in (overrides or {}):
        cfg["vision"]["hidden_size"] = cfg["text"]["hidden_size"]
    return cfg


def parameter_count(cfg: dict[str, Any]) -> int:
    """Approximate parameters of a preset config (for a size estimate before building)."""
    t, v = cfg["text"], cfg["vision"]
    h, i, layers, vocab = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    head_dim = h // t["num_attention_heads"]
    kv = t["num_key_value_heads"] * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    text = layers * per_layer + vocab * h * (1 if cfg["tie_word_embeddings"] else 2)
    e, d = v["embed_dim"], v["depth"]
    patch_in = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    vision = patch_in * e + d * (4 * e * e + 2 * e * e * v["mlp_ratio"])
    merge_in = e * v["spatial_merge_size"] ** 2
    vision += merge_in * merge_in + merge_in * v["hidden_size"]
    return int(text + vision)


def hf_config(cfg: dict[str, Any], special_ids: dict[str, int], dtype: str = "bfloat16") -> Any:
    """The ``Qwen2VLConfig`` of a preset config, with the tokenizer's special-token ids."""
    from transformers import Qwen2VLConfig

    ids = special_ids
    return Qwen2VLConfig(
        text_config={**cfg["text"], "bos_token_id": None, "eos_token_id": ids[IM_END], "pad_token_id": ids[ENDOFTEXT]},
        vision_config=dict(cfg["vision"]),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=cfg["tie_word_embeddings"],
        dtype=dtype,
    )


def _fingerprint(preset: str, overrides: dict[str, Any], seed: int, dtype: str) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "preset": preset,
        "overrides": overrides,
        "seed": seed,
        "dtype": dtype,
        "image_processor": IMAGE_PROCESSOR,
    }


def is_complete(out_dir: Path, preset: str, overrides: dict[str, Any], seed: int, dtype: str) -> bool:
    try:
        info = json.loads((Path(out_dir) / MARKER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    want = _fingerprint(preset, overrides, seed, dtype)
    return all(info.get(k) == v for k, v in want.items()) and all(
        (Path(out_dir) / f).is_file() for f in info.get("files", [])
    )


def build_sized_checkpoint(
    out_dir: str | Path,
    preset: str = "qwen2-vl-2b",
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weights checkpoint of ``preset`` to ``out_dir``; returns the resolved path."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    from .tiny import DEFAULT_CORPUS, _train_tokenizer

    overrides = dict(overrides or {})
    cfg = preset_config(preset, overrides)
    out = Path(out_dir).expanduser().resolve()
    if is_complete(out, preset, overrides, seed, dtype):
        logger.info("sized checkpoint already complete in %s", out)
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER_FILE).exists():
        raise ValueError(f"{str(out)!r} exists and was not made by mm_models.sized; remove it or choose another")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")

    tok = _train_tokenizer(DEFAULT_CORPUS)
    tok.model_max_length = cfg["text"]["max_position_embeddings"]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if cfg["text"]["vocab_size"] < len(tok):
        raise ValueError(f"text.vocab_size {cfg['text']['vocab_size']} < tokenizer size {len(tok)}")
    config = hf_config(cfg, ids, dtype)
    t0 = time.monotonic()
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch_dtype)  # initialise directly in the target dtype (half the RAM)
        try:
            model = Qwen2VLForConditionalGeneration(config).eval()
        finally:
            torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], pad_token_id=ids[ENDOFTEXT], do_sample=False
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("initialised %s (%.2fB parameters, %s) in %.1fs", preset, n_params / 1e9, dtype, time.monotonic() - t0)

    _save_atomically(out, tok, model, {**_fingerprint(preset, overrides, seed, dtype), "parameters": n_params})
    logger.info("wrote %s in %.1fs", out, time.monotonic() - t0)
    return out


def _save_atomically(out: Path, tok, model, marker: dict) -> None:
    """Write into a temporary sibling and rename it: a build cut short never looks complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
        _save_image_processor(tmp)
        marker = {**marker, "files": sorted(p.name for p in tmp.iterdir() if p.is_file())}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_image_processor(out: Path) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(out)
    path = out / _hf.PREPROCESSOR_FILE
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update({"min_pixels": IMAGE_PROCESSOR["min_pixels"], "max_pixels": IMAGE_PROCESSOR["max_pixels"]})
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mm_models.sized",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n"
        + "\n".join(
            f"  {name}: ~{parameter_count(preset_config(name)) / 1e9:.1f}B parameters, LM hidden "
            f"{p['text']['hidden_size']} x {p['text']['num_hidden_layers']} layers, "
            f"vision {p['vision']['embed_dim']} x {p['vision']['depth']} blocks"
            for name, p in PRESETS.items()
        ),
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="qwen2-vl-2b", help="architecture (default qwen2-vl-2b)"
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="weight dtype (default bfloat16)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--num-layers", type=int, help="override text.num_hidden_layers (smaller, faster builds)")
    parser.add_argument("--vision-depth", type=int, help="override vision.depth")
    parser.add_argument(
        "--set",
        type=_parse_override,
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="any other override, e.g. --set text.vocab_size=4096 (JSON values)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the config and size estimate only")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides = dict(args.set)
    if args.num_layers is not None:
        overrides["text.num_hidden_layers"] = args.num_layers
    if args.vision_depth is not None:
        overrides["vision.depth"] = args.vision_depth
    try:
        cfg = preset_config(args.preset, overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = parameter_count(cfg)
    nbytes = size * (4 if args.dtype == "float32" else 2)
    print(
        f"{args.preset}{' with ' + json.dumps(overrides) if overrides else ''}: ~{size / 1e9:.2f}B parameters, "
        f"~{nbytes / 2**30:.1f} GiB as {args.dtype}"
    )
    if args.dry_run:
        try:
            print(json.dumps(cfg, indent=2))
        except BrokenPipeError:
            pass
        return 0
    t0 = time.monotonic()
    try:
        out = build_sized_checkpoint(args.out, args.preset, seed=args.seed, dtype=args.dtype, overrides=overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"checkpoint in {out} ({time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
