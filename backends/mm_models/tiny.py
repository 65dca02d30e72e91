"""Build the tiny Qwen2-VL checkpoint used by tests and as the default model.

The checkpoint is an ordinary Hugging Face directory (config.json, model.safetensors,
generation_config.json, tokenizer.json + tokenizer_config.json + chat_template.jinja,
preprocessor_config.json) that :mod:`mm_models.qwen2vl` and ``from_pretrained`` load offline:

- weights: ``Qwen2VLForConditionalGeneration(config)`` with seeded random init, float32, ~1 MB;
- tokenizer: byte-level BPE (Qwen2's pre-tokenizer) TRAINED LOCALLY with the ``tokenizers`` library on
  ``data/tokenizer_corpus.txt`` plus Qwen2-VL's special tokens; nothing is downloaded;
- image processor: Qwen2-VL's (PIL backend) with ``patch_size=2`` so that small images already give
  many tokens (16 pixels per token): 32x32 -> 64 tokens, 128x128 -> 1024, 184x184 -> 2116,
  256x256 -> 4096 (the maximum; larger images, i.e. every ordinary photo, are downscaled to it).

The build is deterministic for a given seed, takes about a second after imports, and is idempotent:
a directory holding a complete checkpoint of the current recipe (marker file written last, holding a
fingerprint of configs + corpus + seed) is left alone; a stale build of ours is replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import _hf  # noqa: F401  (sets the offline environment before transformers is imported)
from .prompt import CHAT_TEMPLATE, ENDOFTEXT, IM_END, IMAGE_PAD, SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START

logger = logging.getLogger(__name__)

#: Written last; its presence (with matching content) marks a complete checkpoint.
MARKER_FILE = "mm_models_tiny.json"
#: Part of the recipe fingerprint: bump on a change that the fingerprinted constants do not capture.
FORMAT_VERSION = 1
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "data" / "tokenizer_corpus.txt"

TOKENIZER_VOCAB_SIZE = 1024

#: Image preprocessing geometry: 2x2-pixel patches, 2x2 patch merge -> 4x4 pixels per token.
PATCH_SIZE = 2
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 8 * 8  # 4 tokens
#: Released Qwen2-VL checkpoints cap an image at 16384 tokens; the tiny model at 4096, because its vision
#: tower attends over all patches of an image at once (4 per token): a 16384-token image costs ~10 s of
#: CPU on two cores, a 4096-token one ~0.6 s. Every ordinary photo is larger than 256x256 and is resized to
#: this cap by the processor, so tests and CPU demos with real photos stay fast and still need continuations.
MAX_TOKENS = 4096
MAX_PIXELS = MAX_TOKENS * (PATCH_SIZE * MERGE_SIZE) ** 2  # 256 x 256

#: Language model: 2 layers, hidden 64, 4 query / 2 KV heads (head_dim 16, M-RoPE sections 2+3+3).
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    "initializer_range": 0.2,
}

#: Vision tower: one block of width 32 (2 heads), merger to the LM width 64.
VISION_CONFIG: dict[str, Any] = {
    "depth": 1,
    "embed_dim": 32,
    "hidden_size": 64,
    "num_heads": 2,
    "mlp_ratio": 2,
    "patch_size": PATCH_SIZE,
    "spatial_merge_size": MERGE_SIZE,
    "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    "initializer_range": 0.2,
}


def recipe_id(seed: int, corpus: Path | None = None) -> str:
    """Fingerprint of everything the checkpoint is made from: recipe version, configs, geometry,
    tokenizer corpus and seed. A checkpoint whose marker holds another fingerprint is stale."""
    corpus_path = Path(corpus) if corpus is not None else DEFAULT_CORPUS
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": FORMAT_VERSION,
                "seed": seed,
                "text": TEXT_CONFIG,
                "vision": VISION_CONFIG,
                "vocab": TOKENIZER_VOCAB_SIZE,
                "geometry": [PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE, MIN_PIXELS, MAX_PIXELS],
            },
            sort_keys=True,
        ).encode()
    )
    try:
        h.update(corpus_path.read_bytes())
    except OSError:
        h.update(b"<missing corpus>")
    return h.hexdigest()[:16]


def _read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(out_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def is_complete(out_dir: Path, seed: int = 0, corpus: Path | None = None) -> bool:
    """True if ``out_dir`` holds a complete tiny checkpoint of the current recipe for ``seed``."""
    info = _read_marker(Path(out_dir))
    if info is None or info.get("recipe") != recipe_id(seed, corpus):
        return False
    files = info.get("files")
    return isinstance(files, list) and all(isinstance(f, str) and (Path(out_dir) / f).is_file() for f in files)


def _train_tokenizer(corpus: Path) -> Any:
    """Train a byte-level BPE with Qwen2's normalizer/pre-tokenizer; return a ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train([str(corpus)], trainer)
    raw_merges = json.loads(raw.to_str())["model"]["merges"]  # [["a", "b"], ...] (or "a b" in old tokenizers)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in raw_merges]
    tok = Qwen2Tokenizer(
        vocab=raw.get_vocab(),
        merges=merges,  # type: ignore[arg-type]  # tuples are accepted
        unk_token=None,  # type: ignore[arg-type]  # as in the released Qwen2-VL tokenizer
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _build_model(tok: Any, seed: int) -> Any:
    """Seeded random float32 Qwen2-VL whose special-token ids match ``tok``."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            **TEXT_CONFIG,
            "vocab_size": len(tok),
            "bos_token_id": None,
            "eos_token_id": ids[IM_END],
            "pad_token_id": ids[ENDOFTEXT],
        },
        vision_config=dict(VISION_CONFIG),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).to(torch.float32)  # type: ignore[arg-type]
        model.eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT],
        do_sample=False,
    )
    return model


def _save_image_processor(out: Path) -> None:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )
    ip.save_pretrained(out)
    # Also write the pre-5.x top-level keys that released Qwen2-VL checkpoints carry.
    path = out / "preprocessor_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update({"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_checkpoint(out_dir: Path, seed: int = 0, corpus: Path | None = None) -> Path:
    """Create the tiny Qwen2-VL checkpoint in ``out_dir`` and return ``out_dir`` (resolved).

    Idempotent: returns at once if ``out_dir`` already holds a complete checkpoint of the current recipe
    and ``seed`` (see :func:`recipe_id`). A stale one (older recipe, other seed, or incomplete: marked by
    :data:`MARKER_FILE`) is replaced. The files are written into a temporary sibling directory that is
    renamed into place, so a crash or a concurrent build never leaves a half-written ``out_dir``.
    Raises ValueError if ``out_dir`` holds files not made by this function (they are never deleted) or
    if the tokenizer corpus (default: ``data/tokenizer_corpus.txt`` of the repository) is missing.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out = Path(out_dir).expanduser().resolve()
    if is_complete(out, seed, corpus):
        logger.debug("tiny checkpoint already complete in %s", out)
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and _read_marker(out) is None)):
        raise ValueError(
            f"{str(out)!r} exists and is not a tiny checkpoint made by mm_models; remove it or choose another directory"
        )
    corpus_path = Path(corpus) if corpus is not None else DEFAULT_CORPUS
    if not corpus_path.is_file():
        raise ValueError(f"tokenizer training corpus {str(corpus_path)!r} not found")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the checkpoint is meant to be shared
        _write_checkpoint(tmp, seed, corpus_path)
        _move_into_place(tmp, out)
    except OSError:
        if is_complete(out, seed, corpus):  # a concurrent build won the race
            logger.info("tiny checkpoint built concurrently in %s", out)
            return out
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny Qwen2-VL checkpoint (seed %d) in %s", seed, out)
    return out


def _write_checkpoint(tmp: Path, seed: int, corpus: Path) -> None:
    tok = _train_tokenizer(corpus)
    tok.save_pretrained(tmp)
    _build_model(tok, seed).save_pretrained(tmp)
    _save_image_processor(tmp)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in files:
        (tmp / name).chmod(0o644)
    marker = {"format": FORMAT_VERSION, "seed": seed, "recipe": recipe_id(seed, corpus), "files": files}
    (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (empty or a stale tiny build) is moved aside first."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / "ckpt")
    try:
        os.rename(tmp, out)
    finally:
        shutil.rmtree(old, ignore_errors=True)
