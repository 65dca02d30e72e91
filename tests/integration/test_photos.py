"""Every ordinary photo is served (issue 10): resized to the per-image budget by the checkpoint's own
processor, never refused for its size, through a real tritonserver with the default (tiny) model.

Each photo goes through ``mm_pipeline`` and the colocated ``mm_monolithic`` (one over HTTP, the other over
gRPC, alternating), answers, reports its embedding tokens (IMAGE_TOKENS) within the budget, and its greedy
tokens equal the in-process monolithic model's for the same bytes.
"""

from __future__ import annotations

import pytest

from harness import DEFAULT_MODEL_REPOSITORY, TritonServer, metric_value
from mm_client import MMClient
from mm_models.geometry import ImageGeometry
from mm_models.images import decode_image
from photos import ordinary_photos, photo

pytestmark = pytest.mark.integration
PROMPT = "What is in this photo?"
MAX_TOKENS = 6
PHOTOS = ordinary_photos()


def _urls(server, index: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """(pipeline url, protocol), (monolithic url, protocol): HTTP and gRPC alternate between them."""
    http, grpc = (server.http_url, "http"), (server.grpc_url, "grpc")
    return (http, grpc) if index % 2 == 0 else (grpc, http)


def _generate(url_protocol: tuple[str, str], model: str, images: list[bytes], max_tokens: int = MAX_TOKENS):
    url, protocol = url_protocol
    with MMClient(url, protocol=protocol, timeout_s=180, model=model) as client:
        return client.generate(images, PROMPT, max_tokens=max_tokens)


def test_phone_photos_are_turned_upright_before_sizing():
    data, shown = PHOTOS["phone_4032x3024_exif_rotated"]
    assert decode_image(data, 64_000_000).size == shown == (3024, 4032)


def test_a_16_bit_png_keeps_its_picture():
    """Pillow's own conversion clips 16-bit grey to white; the decoder scales it to 8 bits instead."""
    import numpy as np

    image = np.asarray(decode_image(PHOTOS["png_16bit_800x600"][0], 64_000_000))
    assert 60 < image.mean() < 220 and image.std() > 10


@pytest.mark.parametrize("name", list(PHOTOS))
def test_every_ordinary_photo_is_served_within_the_budget(mm_server, monolithic_tokens, tiny_model_dir, name):
    data, (width, height) = PHOTOS[name]
    budget = ImageGeometry.from_model_dir(tiny_model_dir).with_budget()  # the default: the processor's own cap
    expected_tokens = budget.tokens_for(width, height)
    assert expected_tokens <= budget.max_tokens
    index = list(PHOTOS).index(name)
    pipeline_at, monolithic_at = _urls(mm_server, index)
    served = _generate(pipeline_at, "mm_pipeline", [data])
    baseline = _generate(monolithic_at, "mm_monolithic", [data])
    assert served.image_tokens == baseline.image_tokens == [expected_tokens]
    assert served.prompt_tokens > expected_tokens
    assert served.token_ids == baseline.token_ids == monolithic_tokens([data], PROMPT, MAX_TOKENS)
    assert len(served.token_ids) == MAX_TOKENS or served.finish_reason == "stop"


def test_several_photos_in_one_request(mm_server, monolithic_tokens):
    images = [PHOTOS["jpeg_640x480"][0], PHOTOS["panorama_3000x200"][0], PHOTOS["png_16bit_800x600"][0]]
    served = _generate((mm_server.grpc_url, "grpc"), "mm_pipeline", images)
    assert len(served.image_tokens) == 3 and all(n >= 1 for n in served.image_tokens)
    assert served.token_ids == monolithic_tokens(images, PROMPT, MAX_TOKENS)


def test_resized_images_are_counted(mm_server):
    small = photo(64, 48, seed=9)  # below the budget: rounded to whole tokens, not downscaled
    big = photo(1600, 1200, seed=10)

    def resized(model: str) -> float:
        return sum(
            metric_value(mm_server.metrics(), "mm_images_resized_total", 0.0, model=model, instance=i)
            for i in _instances(mm_server, model)
        )

    before = {m: resized(m) for m in ("mm_encoder", "mm_monolithic")}
    _generate((mm_server.http_url, "http"), "mm_pipeline", [small, big], max_tokens=1)
    _generate((mm_server.http_url, "http"), "mm_monolithic", [small, big], max_tokens=1)
    assert resized("mm_encoder") == before["mm_encoder"] + 1
    assert resized("mm_monolithic") == before["mm_monolithic"] + 1


def _instances(server, model: str) -> list[str]:
    return sorted(
        {
            dict(labels).get("instance", "")
            for (name, labels) in server.metrics()
            if name == "mm_images_resized_total" and dict(labels).get("model") == model
        }
    )


@pytest.fixture(scope="module")
def budget_server(tiny_model_dir, tmp_path_factory):
    """A server given a smaller budget, as `scripts/serve --mm-processor-kwargs '{"max_pixels": 16384}'` does."""
    log = tmp_path_factory.mktemp("photos") / "server.log"
    env = {"MM_CHECKPOINT": str(tiny_model_dir), "MM_MAX_PIXELS": str(1024 * 16), "MM_MIN_PIXELS": str(8 * 8)}
    args = [
        "--model-control-mode=explicit",
        *(
            f"--load-model={m}"
            for m in ("mm_encoder", "mm_language", "mm_pipeline", "mm_monolithic")  # the BLS pipeline's steps too
        ),
    ]
    with TritonServer(DEFAULT_MODEL_REPOSITORY, env=env, args=args, log_file=log, startup_timeout_s=300) as server:
        yield server


def test_a_configured_budget_downsizes_every_image_to_it(budget_server, tiny_model_dir):
    from mm_models.qwen2vl import MonolithicModel

    budget = ImageGeometry.from_model_dir(tiny_model_dir).with_budget(max_pixels=1024 * 16)
    assert budget.max_tokens == 1024
    oracle = MonolithicModel.from_pretrained(tiny_model_dir, geometry=budget)
    for index, name in enumerate(("phone_4032x3024_exif_rotated", "strip_200x3000")):
        data, (width, height) = PHOTOS[name]
        pipeline_at, monolithic_at = _urls(budget_server, index)
        served = _generate(pipeline_at, "mm_pipeline", [data])
        baseline = _generate(monolithic_at, "mm_monolithic", [data])
        assert served.image_tokens == baseline.image_tokens == [budget.tokens_for(width, height)]
        assert served.image_tokens[0] <= 1024
        expected = oracle.generate([decode_image(data, 64_000_000)], PROMPT, MAX_TOKENS)
        assert served.token_ids == baseline.token_ids == expected
