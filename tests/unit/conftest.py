"""Fixtures shared by the engine's unit tests: the tiny checkpoint's oracle and vision tower, loaded once per module."""

import pytest


@pytest.fixture(scope="module")
def mono(tiny_model_dir):
    from mm_models.qwen2vl import MonolithicModel

    return MonolithicModel.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    from mm_models.qwen2vl import VisionEncoder

    return VisionEncoder.from_pretrained(tiny_model_dir)
