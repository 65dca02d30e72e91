"""The per-image budget: tokens <-> max_pixels arithmetic, and the processor applying it (issue 10)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mm_bench.images import TINY_GEOMETRY
from mm_models.geometry import ImageGeometry
from mm_triton.image_budget import budget_parameter, resolve_image_geometry

# Qwen2-VL-2B-Instruct's preprocessor_config.json: 14-pixel patches merged 2x2 -> 28x28 pixels per token
QWEN2VL_2B = ImageGeometry(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=12845056)


def test_the_2b_geometry_is_the_released_one():
    assert QWEN2VL_2B.max_pixels == 12845056 and QWEN2VL_2B.factor == 28 and QWEN2VL_2B.max_tokens == 16384


@pytest.mark.parametrize(
    "geometry, tokens, pixels",
    [
        (TINY_GEOMETRY, 0, 65536),  # 0 = the checkpoint's own bound (4096 tokens x 4x4 pixels)
        (TINY_GEOMETRY, 1024, 1024 * 16),
        (TINY_GEOMETRY, 99999, 65536),  # never above what the checkpoint allows
        (QWEN2VL_2B, 0, 12845056),
        (QWEN2VL_2B, 8192, 8192 * 784),
        (QWEN2VL_2B, 1280, 1003520),  # the vLLM docs' example max_pixels
    ],
)
def test_budget_in_tokens_sets_max_pixels(geometry, tokens, pixels):
    budget = geometry.with_budget(max_tokens=tokens)
    assert budget.max_pixels == pixels
    assert budget.max_tokens == pixels // geometry.factor**2
    assert budget.processor_kwargs() == {"min_pixels": geometry.min_pixels, "max_pixels": pixels}


def test_the_smaller_of_pixels_and_tokens_wins():
    assert QWEN2VL_2B.with_budget(max_tokens=8192, max_pixels=1003520).max_pixels == 1003520
    assert QWEN2VL_2B.with_budget(max_tokens=1000, max_pixels=1003520).max_pixels == 1000 * 784
    assert QWEN2VL_2B.with_budget(min_pixels=3136 * 4).min_pixels == 3136 * 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_pixels=True), "max_pixels"),
        (dict(max_pixels=100), "below min_pixels"),
        (dict(min_pixels=10**7, max_pixels=10**6), "below min_pixels"),
    ],
)
def test_bad_budgets_are_refused_with_the_reason(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QWEN2VL_2B.with_budget(**kwargs)


# phone photos, screenshots, panoramas, strips: every ordinary image fits the budget after resizing
SIZES = st.tuples(st.integers(16, 12000), st.integers(16, 12000)).filter(lambda s: max(s) / min(s) <= 20)


@settings(max_examples=300, deadline=None)
@given(size=SIZES, tokens=st.sampled_from([0, 256, 1024, 4096, 8192, 16384]))
def test_resized_images_never_exceed_the_budget(size, tokens):
    width, height = size
    for geometry in (TINY_GEOMETRY, QWEN2VL_2B):
        budget = geometry.with_budget(max_tokens=tokens)
        got = budget.tokens_for(width, height)
        assert 1 <= got <= budget.max_tokens
        assert budget.downscales(width, height) == (
            round(width / geometry.factor) * round(height / geometry.factor) * geometry.factor**2 > budget.max_pixels
        )


@pytest.mark.parametrize(
    "width, height", [(640, 480), (1024, 768), (4032, 3024), (1344, 1344), (3000, 200), (200, 3000), (33, 47)]
)
def test_the_processor_given_the_budget_agrees_with_the_arithmetic(tiny_model_dir, width, height):
    """The checkpoint's own processor, loaded with processor_kwargs, resizes exactly as the geometry says."""
    from mm_models.qwen2vl import _loading

    for tokens in (0, 512):
        budget = ImageGeometry.from_model_dir(tiny_model_dir).with_budget(max_tokens=tokens)
        processor = _loading.load_image_processor(tiny_model_dir, budget)
        patches = processor.get_number_of_image_patches(height, width)
        assert patches // budget.merge_size**2 == budget.tokens_for(width, height) <= budget.max_tokens


def test_parameters_resolve_with_environment_overrides(tiny_model_dir):
    params = {"max_embed_tokens": "0", "max_pixels": "", "min_pixels": "0"}
    assert resolve_image_geometry(tiny_model_dir, params, env={}).max_tokens == 4096
    assert resolve_image_geometry(tiny_model_dir, {**params, "max_embed_tokens": "1000"}, env={}).max_tokens == 1000
    env = {"MM_MAX_PIXELS": str(256 * 16)}
    assert resolve_image_geometry(tiny_model_dir, params, env=env).max_tokens == 256
    with pytest.raises(ValueError, match="max_pixels: cannot parse"):
        budget_parameter({"max_pixels": "lots"}, "max_pixels", env={})
    with pytest.raises(ValueError, match="min_pixels: -5 is outside"):
        budget_parameter({"min_pixels": "-5"}, "min_pixels", env={})
    with pytest.raises(ValueError, match="below min_pixels"):
        resolve_image_geometry(tiny_model_dir, {"max_pixels": "32"}, env={})


# ---- scripts/serve: the budget flags (no server) ------------------------------------------------------
def _serve_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve_script_budget", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_flags_set_the_budget_like_vllm():
    serve = _serve_module()
    args = serve.build_parser().parse_args(
        ["--mm-processor-kwargs", '{"max_pixels": 1003520, "min_pixels": 3136}', "--max-embed-tokens", "900"]
    )
    serve.check_role_options(args)
    env = serve.model_env(args)
    assert env["MM_MAX_PIXELS"] == "1003520" and env["MM_MIN_PIXELS"] == "3136" and env["MM_MAX_EMBED_TOKENS"] == "900"
    for bad in ('{"max_pixel": 5}', '{"max_pixels": -1}', '{"max_pixels": 1.5}', "[1]", "not json"):
        with pytest.raises(SystemExit):
            serve.build_parser().parse_args(["--mm-processor-kwargs", bad])


# ---- the encoder refuses an impossible request from image headers, before decoding ------------------------
def test_a_request_the_pool_can_never_hold_is_refused_before_any_decoding(tiny_model_dir, monkeypatch):
    import io

    from PIL import Image

    import mm_encoder.service as service_module
    from mm_encoder.service import EncoderService
    from mmtransfer import RequestTooLarge, TransferConfig

    def png(width: int, height: int) -> bytes:  # large but cheap: one colour compresses to a few KiB
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (width % 251, 40, 90)).save(buf, format="PNG")
        return buf.getvalue()

    config = TransferConfig(block_tokens=128, pool_blocks=40, max_embed_tokens=4096)  # one 32-block image fits
    service = EncoderService(tiny_model_dir, config, max_encode_batch_tokens=8192)
    try:
        decoded = []
        real_decode = service_module.decode_image
        monkeypatch.setattr(service_module, "decode_image", lambda *a: decoded.append(1) or real_decode(*a))
        with pytest.raises(RequestTooLarge, match="need 64 blocks"):
            service.encode([png(3000, 2000), png(2000, 3000)])  # each resized to ~4096 tokens = 32 blocks
        assert decoded == [] and service.pool.used_blocks == 0
        assert len(service.encode([png(3000, 2000)])) == 1 and decoded == [1]  # one alone is served
    finally:
        service.close()
