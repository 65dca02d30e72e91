"""mm_models.sized: realistic-dimension presets, and a shrunk build that loads through the split path."""

from __future__ import annotations

import json

import pytest

from mm_models.sized import MARKER_FILE, PRESETS, build_sized_checkpoint, main, parameter_count, preset_config

SMALL = {
    "text.hidden_size": 64,
    "text.intermediate_size": 128,
    "text.num_hidden_layers": 1,
    "text.num_attention_heads": 4,
    "text.num_key_value_heads": 2,
    "text.vocab_size": 2048,
    "text.rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
    "vision.embed_dim": 32,
    "vision.depth": 1,
    "vision.num_heads": 2,
}


def test_presets_have_the_released_sizes():
    assert parameter_count(preset_config("qwen2-vl-2b")) == pytest.approx(2.21e9, rel=0.01)
    assert parameter_count(preset_config("qwen2-vl-7b")) == pytest.approx(8.29e9, rel=0.01)
    cfg = preset_config("qwen2-vl-2b", {"text.num_hidden_layers": 2})
    assert cfg["text"]["num_hidden_layers"] == 2 and PRESETS["qwen2-vl-2b"]["text"]["num_hidden_layers"] == 28
    assert preset_config("qwen2-vl-7b", {"text.hidden_size": 64})["vision"]["hidden_size"] == 64
    with pytest.raises(ValueError):
        preset_config("qwen2-vl-2b", {"bogus": 1})
    with pytest.raises(ValueError):
        preset_config("nope")


def test_preset_configs_build_with_matching_parameter_counts():
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from mm_models.prompt import SPECIAL_TOKENS
    from mm_models.sized import hf_config

    ids = {t: 1000 + i for i, t in enumerate(SPECIAL_TOKENS)}
    for name in PRESETS:
        cfg = preset_config(name)
        with torch.device("meta"):
            model = Qwen2VLForConditionalGeneration(hf_config(cfg, ids))
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameter_count(cfg), rel=0.001)


def test_small_build_loads_split_and_monolithic_alike(tmp_path):
    from mm_bench.images import make_test_image, tokens_for_image_size
    from mm_models.images import decode_image
    from mm_models.qwen2vl import LanguageModel, MonolithicModel, VisionEncoder

    out = build_sized_checkpoint(tmp_path / "ck", "qwen2-vl-2b", dtype="float32", overrides=SMALL)
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["preset"] == "qwen2-vl-2b" and marker["overrides"]["text.num_hidden_layers"] == 1
    assert build_sized_checkpoint(out, "qwen2-vl-2b", dtype="float32", overrides=SMALL) == out  # idempotent
    image = decode_image(make_test_image(tokens=200, seed=1, model_dir=out), 10**8)
    assert image.width % 28 == 0 and tokens_for_image_size(out, *image.size) >= 200  # 28x28 pixels per token
    vision, lm = VisionEncoder.from_pretrained(out), LanguageModel.from_pretrained(out)
    encoded = vision.encode(image)
    assert encoded.embeds.shape[1] == 64
    split = lm.generate("Describe", [encoded], 4)
    assert split == MonolithicModel.from_pretrained(out).generate([image], "Describe", 4)


def test_cli_dry_run_and_foreign_dir(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--dry-run", "--num-layers", "2"]) == 0
    assert "qwen2-vl-2b" in capsys.readouterr().out
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "file").write_text("x")
    assert (
        main(
            ["--out", str(tmp_path / "foreign"), "--set", "text.vocab_size=2048"]
            + [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
        )
        == 2
    )
