"""Tests of the model package mm_models: tiny checkpoint, image decoding, vision/language split vs oracle.

The split path (VisionEncoder.encode -> LanguageModel.generate) must give EXACTLY the greedy tokens of
the monolithic model's generate() for the same images and prompt, including images whose embeddings
need 1, 2 and 5+ continuations at a 1024-token receive window.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from mm_bench import images as testing  # noqa: E402
from mm_models import geometry, prompt, tiny  # noqa: E402
from mm_models.images import decode_image  # noqa: E402
from mm_models.qwen2vl import EncodedImage, LanguageModel, MonolithicModel, VisionEncoder  # noqa: E402

PROMPT = "Describe the image in one sentence."
MAX_NEW = 8
MAX_PIXELS = 4096 * 4096


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    """The shared tiny checkpoint if complete (seed 0, current recipe), else a fresh build in a tmp dir."""
    shared = testing.default_tiny_dir()
    if tiny.is_complete(shared, seed=0):
        return shared
    return tiny.build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-qwen2-vl", seed=0)


@pytest.fixture(scope="session")
def encoder(ckpt) -> VisionEncoder:
    return VisionEncoder.from_pretrained(ckpt)


@pytest.fixture(scope="session")
def lm(ckpt) -> LanguageModel:
    return LanguageModel.from_pretrained(ckpt)


@pytest.fixture(scope="session")
def mono(ckpt) -> MonolithicModel:
    return MonolithicModel.from_pretrained(ckpt)


def _image(tokens: int | None = None, size: tuple[int, int] | None = None, seed: int = 0) -> Image.Image:
    if tokens is not None:
        data = testing.make_test_image(tokens=tokens, seed=seed)
    else:
        data = testing.make_test_image(*size, seed=seed)
    return decode_image(data, MAX_PIXELS)


# ------------------------------------------------------------------------------------------ tiny build
def test_build_is_idempotent_deterministic_and_loads_offline(tmp_path):
    a = tiny.build_tiny_checkpoint(tmp_path / "a", seed=0)
    assert tiny.is_complete(a, seed=0)
    weights = a / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert tiny.build_tiny_checkpoint(a, seed=0) == a
    assert time.perf_counter() - t0 < 0.5
    assert weights.stat().st_mtime_ns == mtime
    assert weights.stat().st_size < 4 * 2**20

    b = tiny.build_tiny_checkpoint(tmp_path / "b", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "preprocessor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = tiny.build_tiny_checkpoint(tmp_path / "c", seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()

    # a stale build of ours (other seed, older recipe) is replaced; foreign files are never touched
    assert tiny.build_tiny_checkpoint(c, seed=0) == c and tiny.is_complete(c, seed=0)
    assert (c / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    marker = json.loads((c / tiny.MARKER_FILE).read_text())
    (c / tiny.MARKER_FILE).write_text(json.dumps({**marker, "recipe": "older"}))
    assert not tiny.is_complete(c, seed=0)
    tiny.build_tiny_checkpoint(c, seed=0)
    assert tiny.is_complete(c, seed=0)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a tiny checkpoint made by mm_models"):
        tiny.build_tiny_checkpoint(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "x.txt").read_text() == "x"

    # plain transformers loads it offline, with every weight present
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(a, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = AutoTokenizer.from_pretrained(a, local_files_only=True)
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids(prompt.IMAGE_PAD)
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids(prompt.VISION_START)
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids(prompt.VISION_END)
    assert cfg.text_config.eos_token_id == tok.convert_tokens_to_ids(prompt.IM_END)


def test_cli_fast_path(ckpt):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "mm_models.build_tiny", "--out", str(ckpt)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "already complete" in r.stdout
    assert time.perf_counter() - t0 < 10


def test_checkpoint_uses_released_key_layout(ckpt):
    """transformers 5 saves the released layout (visual.*, model.layers.*): loading it exercises the same
    key conversions as a real Qwen2-VL checkpoint."""
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("visual.") for k in keys)
    assert any(k.startswith("model.layers.") for k in keys)


def test_tokenizer_and_chat_template(lm):
    tok = lm.tokenizer
    for t in prompt.SPECIAL_TOKENS:
        assert len(tok(t)["input_ids"]) == 1, t
    text = "The quick brown fox jumps over the lazy dog."
    assert tok.decode(tok(text)["input_ids"]) == text
    for n in (0, 1, 2):
        content = [{"type": "image"}] * n + [{"type": "text", "text": PROMPT}]
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        assert rendered == prompt.render_prompt(PROMPT, n)


# ------------------------------------------------------------------------------------------ decode_image
def _png(size=(20, 10), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims width x height (CRC fixed): a decompression bomb's header."""
    data = bytearray(_png((4, 4)))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "I;16"])
def test_decode_image_modes(mode):
    img = decode_image(_png((20, 10), mode), 1000)
    assert img.mode == "RGB" and img.size == (20, 10)


def test_decode_image_jpeg_and_exif_orientation():
    im = testing.random_image(30, 20, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    out = decode_image(buf.getvalue(), 10_000)
    assert out.mode == "RGB" and out.size == (20, 30)
    assert decode_image(bytearray(testing.make_test_image(30, 20, fmt="JPEG")), 10_000).size == (30, 20)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"hello, this is not an image at all", "not in a recognised image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt|recognised"),
        ("not bytes", "must be bytes"),
        (None, "must be bytes"),
    ],
)
def test_decode_image_rejects_garbage(data, match):
    with pytest.raises(ValueError, match=match):
        decode_image(data, 10_000)


def test_decode_image_rejects_truncated_and_corrupt():
    png = testing.make_test_image(64, 64, cell=1)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        decode_image(png[: len(png) // 2], 10_000)
    jpg = testing.make_test_image(64, 64, fmt="JPEG", cell=1)
    with pytest.raises(ValueError, match="truncated or corrupt|corrupt"):
        decode_image(jpg[:200], 10_000)
    bad = bytearray(png)
    idat = bad.index(b"IDAT")
    bad[idat + 20 : idat + 60] = b"\xff" * 40  # breaks the chunk CRC / zlib stream
    with pytest.raises(ValueError, match="truncated or corrupt"):
        decode_image(bytes(bad), 10_000)


def test_decode_image_rejects_bombs_before_decoding():
    pil_limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="more than the allowed 1000000"):
        decode_image(_png_with_header_size(3000, 3000), 1_000_000)
    # beyond Pillow's own global limit (2 * Image.MAX_IMAGE_PIXELS): still a clean ValueError
    with pytest.raises(ValueError, match="too large|more than the allowed"):
        decode_image(_png_with_header_size(100_000, 100_000), 10**12)
    assert pil_limit == Image.MAX_IMAGE_PIXELS  # the process-wide limit is left alone
    with pytest.raises(ValueError, match="more than the allowed 199"):
        decode_image(_png((20, 10)), 199)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_pixels"):
            decode_image(_png(), bad)


def test_decode_image_mutated_inputs_only_raise_valueerror():
    """Random corruptions of valid files in several formats: a decoded RGB image or ValueError, nothing else."""
    import random
    import warnings

    rng = random.Random(0)
    bases = []
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        testing.random_image(24, 16, seed=1).save(buf, format=fmt)
        bases.append(buf.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(300):
            data = bytearray(rng.choice(bases))
            if rng.random() < 0.5:
                data = data[: rng.randrange(len(data))]
            for _ in range(rng.randint(0, 6) if data else 0):
                data[rng.randrange(len(data))] = rng.randrange(256)
            with contextlib.suppress(ValueError):
                assert decode_image(bytes(data), 10**6).mode == "RGB"


# ------------------------------------------------------------------------------------------ geometry
def test_geometry_matches_transformers_and_checkpoint(ckpt):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    g = geometry.ImageGeometry.from_model_dir(ckpt)
    assert g == testing.TINY_GEOMETRY
    assert g.max_tokens == tiny.MAX_TOKENS == 4096  # released checkpoints: 16384 (tiny.py says why less)
    for h, w in [(1, 1), (7, 300), (33, 47), (299, 301), (512, 512), (640, 480), (4000, 30), (30, 4000)]:
        assert geometry.smart_resize(h, w, g.factor, g.min_pixels, g.max_pixels) == hf_smart_resize(
            h, w, g.factor, g.min_pixels, g.max_pixels
        )


@pytest.mark.parametrize("n", [1, 4, 64, 100, 300, 1025, 2049, 3001, 4096])
def test_image_size_for_tokens(n):
    w, h = testing.image_size_for_tokens(None, n)
    got = testing.tokens_for_image_size(None, w, h)
    assert n <= got <= n + int(n**0.5) + 1 or (n < 4 and got == 4)


def test_image_size_for_tokens_limits():
    with pytest.raises(ValueError, match="exceed"):
        testing.image_size_for_tokens(None, 4097)
    with pytest.raises(ValueError):
        testing.image_size_for_tokens(None, 0)


def test_make_test_image_is_deterministic():
    assert testing.make_test_image(40, 30, seed=3) == testing.make_test_image(40, 30, seed=3)
    assert testing.make_test_image(40, 30, seed=3) != testing.make_test_image(40, 30, seed=4)
    with pytest.raises(ValueError):
        testing.make_test_image(40, 30, tokens=10)


# ------------------------------------------------------------------------------------------ vision side
def test_sides_load_only_their_weights(encoder, lm, mono):
    enc_params = dict(encoder._model.named_parameters())
    lm_params = dict(lm._model.named_parameters())
    full = dict(mono._model.named_parameters())
    assert enc_params and all(k.startswith("model.visual.") for k in enc_params)
    assert lm_params and not any(k.startswith("model.visual.") for k in lm_params)
    assert set(enc_params) | set(lm_params) == set(full)
    for name, p in {**enc_params, **lm_params}.items():
        assert torch.equal(p, full[name]), name
    assert encoder.hidden_size == lm.hidden_size == 64
    assert encoder.dtype == lm.dtype == torch.float32


@pytest.mark.parametrize(
    "size", [(1, 1), (5, 3), (32, 32), (33, 47), (100, 60), (128, 128), (300, 7), (184, 184), (290, 291), (1000, 250)]
)
def test_count_tokens_matches_encode(encoder, size):
    """count_tokens (processor geometry) == rows encode() produces; large sizes are downscaled to the
    maximum, where only the geometry is compared (one full-size encode is in the next test)."""
    img = testing.random_image(*size, seed=sum(size))
    n = encoder.count_tokens(img)
    assert n == testing.tokens_for_image_size(None, *size)
    assert 4 <= n <= encoder.max_tokens
    if n > 6000:
        assert n > encoder.max_tokens * 0.9
        return
    enc = encoder.encode(img)
    assert enc.embeds.shape == (n, encoder.hidden_size)
    assert enc.num_tokens == n
    t, h, w = enc.grid_thw
    assert t == 1 and h * w == 4 * n


def test_encode_at_maximum_tokens(encoder):
    img = testing.random_image(600, 600, seed=1)  # downscaled to the 4096-token maximum
    assert encoder.count_tokens(img) == encoder.max_tokens == 4096
    assert encoder.encode(img).embeds.shape == (4096, encoder.hidden_size)


def test_count_tokens_rejects(encoder):
    with pytest.raises(ValueError, match="aspect ratio"):
        encoder.count_tokens(testing.random_image(1000, 2))
    with pytest.raises(ValueError, match="PIL"):
        encoder.count_tokens(b"png bytes")


def test_encoder_dtype_option(ckpt, lm):
    enc16 = VisionEncoder.from_pretrained(ckpt, dtype="bfloat16")
    e = enc16.encode(_image(tokens=64))
    assert enc16.dtype == torch.bfloat16 and e.embeds.dtype == torch.bfloat16
    assert len(lm.generate(PROMPT, [e], 2)) >= 1  # the LM casts embeddings to its own dtype


# ------------------------------------------------------------------------------------------ split == oracle
CASES = {
    "text_only": [],
    "small_64": [dict(tokens=64, seed=1)],
    "small_300": [dict(size=(80, 60), seed=2)],
    "over_1024": [dict(tokens=1025, seed=3)],
    "over_2048": [dict(tokens=2049, seed=4)],
    "at_max_4096": [dict(tokens=4096, seed=5)],
    "two_images": [dict(size=(64, 48), seed=6), dict(tokens=1100, seed=7)],
}
MIN_TOKENS = {"over_1024": 1025, "over_2048": 2049, "at_max_4096": 4096}


@pytest.mark.parametrize("case", list(CASES))
def test_split_equals_monolithic(case, encoder, lm, mono):
    images = [_image(**spec) for spec in CASES[case]]
    encoded = [encoder.encode(im) for im in images]
    counts = [e.num_tokens for e in encoded]
    assert counts == [encoder.count_tokens(im) for im in images]
    if case in MIN_TOKENS:
        assert counts[0] >= MIN_TOKENS[case]
    if case.startswith("small"):
        assert 64 <= counts[0] <= 300

    split = lm.generate(PROMPT, encoded, MAX_NEW)
    oracle = mono.generate(images, PROMPT, MAX_NEW)
    assert split == oracle
    assert 1 <= len(split) <= MAX_NEW
    assert len(split) == MAX_NEW or split[-1] in (
        lm.tokenizer.convert_tokens_to_ids(prompt.IM_END),
        lm.tokenizer.convert_tokens_to_ids(prompt.ENDOFTEXT),
    )
    assert len(set(split)) > 1, f"trivial generation {split}"
    assert isinstance(lm.decode(split), str)


def test_images_influence_generation(encoder, lm):
    a = encoder.encode(_image(tokens=64, seed=1))
    b = encoder.encode(_image(tokens=64, seed=11))
    zeros = EncodedImage(torch.zeros_like(a.embeds), a.grid_thw)
    outs = {tuple(lm.generate(PROMPT, [x], MAX_NEW)) for x in (a, b, zeros)}
    outs.add(tuple(lm.generate(PROMPT, [], MAX_NEW)))
    assert len(outs) == 4


def test_monolithic_generate_function(ckpt, mono):
    from mm_models.qwen2vl import monolithic_generate

    im = _image(tokens=64, seed=1)
    assert monolithic_generate(ckpt, [im], PROMPT, 4) == mono.generate([im], PROMPT, 4)


# ------------------------------------------------------------------------------------------ language side
def test_build_input_ids_layout(lm, ckpt):
    tok = lm.tokenizer
    ids = lm.build_input_ids(PROMPT, [3, 5])
    vs, ve, pad = (tok.convert_tokens_to_ids(t) for t in (prompt.VISION_START, prompt.VISION_END, prompt.IMAGE_PAD))
    assert ids[0] == tok.convert_tokens_to_ids(prompt.IM_START)
    first = ids.index(vs)
    assert ids[first : first + 5] == [vs, pad, pad, pad, ve]
    assert ids[first + 5 : first + 12] == [vs] + [pad] * 5 + [ve]
    assert tok.decode(ids[first + 12 :]).startswith(PROMPT)
    assert ids.count(pad) == 8
    assert lm.build_input_ids(PROMPT, []) == tok(prompt.render_prompt(PROMPT, 0))["input_ids"]


def test_generate_validates_inputs(encoder, lm):
    good = encoder.encode(_image(tokens=64, seed=1))
    t, h, w = good.grid_thw
    bad_cases = [
        (EncodedImage(good.embeds[:-1], good.grid_thw), "implies 64 tokens"),
        (EncodedImage(good.embeds[:, :32], good.grid_thw), "hidden size 64"),
        (EncodedImage(good.embeds, (t, h + 1, w)), "multiples of the merge size"),
        (EncodedImage(good.embeds, (1, 16)), "three positive ints"),  # type: ignore[arg-type]
        (EncodedImage(good.embeds, (0, 16, 16)), "three positive ints"),
        (EncodedImage(good.embeds.reshape(-1), good.grid_thw), "2-D tensor"),
        (EncodedImage(good.embeds.long(), good.grid_thw), "floating point"),
        (good.embeds, "expected an EncodedImage"),
    ]
    for img, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            lm.generate(PROMPT, [img], 2)
    with pytest.raises(ValueError, match="image 1"):
        lm.generate(PROMPT, [good, EncodedImage(good.embeds[:-1], good.grid_thw)], 2)
    with pytest.raises(ValueError, match="reserved vision token"):
        lm.generate("look: " + prompt.IMAGE_PAD, [good], 2)
    with pytest.raises(ValueError, match="prompt must be a string"):
        lm.generate(None, [good], 2)  # type: ignore[arg-type]
    for n in (0, -1, 1.0, True, 10**6):
        with pytest.raises(ValueError, match="max_new_tokens"):
            lm.generate(PROMPT, [good], n)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="context"):
        lm.generate(PROMPT, [good], 32768)
    with pytest.raises(ValueError, match="list"):
        lm.generate(PROMPT, good, 2)  # type: ignore[arg-type]


def test_loaders_reject_bad_dirs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        VisionEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):
        LanguageModel.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")
    with pytest.raises(ValueError, match="no config.json"):
        LanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type"):
        MonolithicModel.from_pretrained(tmp_path)
