"""mm_remote without servers: encoder URLs, round-robin and fail-over, error mapping, generated
repositories, instance indices; and the encoder's threaded multi-image path (order, no leaks)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from mm_remote import EncoderCallError, RemoteEncoders, parse_encoder_urls
from mm_remote.repository import ROLES, SOURCES, build_repository, instance_count, parse_gpus
from mm_triton.params import instance_index


# ---- URLs ---------------------------------------------------------------------------------------
def test_parse_encoder_urls():
    assert parse_encoder_urls("a:1") == ["a:1"]
    assert parse_encoder_urls(["a:1,b.example.com:8011", "grpc://10.0.0.5:8011", "[::1]:9"]) == [
        "a:1",
        "b.example.com:8011",
        "10.0.0.5:8011",
        "[::1]:9",
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("", "no encoder server"),
        ("host", "HOST:PORT"),
        ("host:0", "HOST:PORT"),
        ("host:70000", "HOST:PORT"),
        ("http://h:1", "HOST:PORT"),
        ("a:1,a:1", "listed twice"),
        ("a b:1:2", "HOST:PORT"),
    ],
)
def test_parse_encoder_urls_refuses(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_encoder_urls(bad)


# ---- round-robin, fail-over, errors -------------------------------------------------------------
class _Result:
    def __init__(self, refs):
        self._refs = refs

    def as_numpy(self, name):
        assert name == "EMBED_REF"
        return self._refs


class FakeClient:
    """Answers like tritonclient.grpc's client; ``fail`` is an exception to raise instead."""

    def __init__(self, url):
        self.url, self.fail, self.calls = url, None, 0

    def infer(self, model, inputs, outputs=None, request_id="", client_timeout=None):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        n = inputs[0].shape()[0]
        return _Result(np.array([f'{{"from":"{self.url}"}}'.encode()] * n, dtype=np.object_))

    def close(self):
        pass


def _encoders(urls, **kw):
    clients = {}

    def factory(url):
        clients[url] = FakeClient(url)
        return clients[url]

    events = []
    enc = RemoteEncoders(urls, client_factory=factory, observer=lambda u, o: events.append((u, o)), **kw)
    return enc, clients, events


IMAGES = np.array([b"img0", b"img1"], dtype=np.object_)


def test_round_robin_with_start_offset():
    enc, clients, _ = _encoders(["a:1", "b:1", "c:1"], start=1)
    used = [enc.encode(IMAGES)[1] for _ in range(6)]
    assert used == ["b:1", "c:1", "a:1", "b:1", "c:1", "a:1"]
    refs, _ = enc.encode(IMAGES)
    assert refs.shape == (2,)


def test_unavailable_server_is_skipped_and_tried_last_for_a_while():
    enc, clients, events = _encoders(["a:1", "b:1"], cooldown_s=60)
    clients["a:1"].fail = InferenceServerException(
        "failed to connect to all addresses; Connection refused", status="StatusCode.UNAVAILABLE"
    )
    assert enc.encode(IMAGES)[1] == "b:1"
    assert events == [("a:1", "unavailable"), ("b:1", "ok")]
    # a:1 cools down: the next requests go to b:1 without trying a:1 first
    assert [enc.encode(IMAGES)[1] for _ in range(3)] == ["b:1"] * 3
    assert clients["a:1"].calls == 1
    clients["a:1"].fail = None
    enc._down_until.clear()
    assert {enc.encode(IMAGES)[1] for _ in range(2)} == {"a:1", "b:1"}


def test_all_unavailable_names_every_url():
    enc, clients, _ = _encoders(["a:1", "b:2"])
    for c in clients.values():
        c.fail = InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
    with pytest.raises(EncoderCallError) as info:
        enc.encode(IMAGES)
    assert info.value.code == "UNAVAILABLE"
    assert "a:1 unavailable: unreachable" in str(info.value) and "b:2 unavailable" in str(info.value)


def test_single_unreachable_url_message():
    enc, clients, _ = _encoders(["h:8011"])
    clients["h:8011"].fail = InferenceServerException(
        "failed to connect to all addresses", status="StatusCode.UNAVAILABLE"
    )
    with pytest.raises(EncoderCallError, match=r"^encoder server h:8011 unavailable: unreachable"):
        enc.encode(IMAGES)


def test_unknown_model_is_unavailable_and_skipped():
    enc, clients, _ = _encoders(["a:1", "b:1"])
    clients["a:1"].fail = InferenceServerException(
        "Request for unknown model: 'mm_encoder' is not found", status="StatusCode.NOT_FOUND"
    )
    assert enc.encode(IMAGES)[1] == "b:1"


def test_bad_input_is_not_retried_and_keeps_its_code():
    enc, clients, events = _encoders(["a:1", "b:1"])
    clients["a:1"].fail = InferenceServerException(
        "invalid input: IMAGE[0]: not an image", status="StatusCode.INVALID_ARGUMENT"
    )
    with pytest.raises(EncoderCallError) as info:
        enc.encode(IMAGES)
    assert info.value.code == "INVALID_ARG"
    assert str(info.value) == "invalid input: IMAGE[0]: not an image (encoder server a:1)"
    assert clients["b:1"].calls == 0 and events == [("a:1", "error")]


def test_timeout_is_unavailable_without_retry():
    enc, clients, _ = _encoders(["a:1", "b:1"], timeout_s=7)
    clients["a:1"].fail = InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")
    with pytest.raises(EncoderCallError, match="did not answer within 7 s") as info:
        enc.encode(IMAGES)
    assert info.value.code == "UNAVAILABLE" and clients["b:1"].calls == 0


def test_wrong_number_of_refs_is_internal():
    enc, clients, _ = _encoders(["a:1"])
    clients["a:1"].infer = lambda *a, **k: _Result(np.array([b"x"], dtype=np.object_))
    with pytest.raises(EncoderCallError, match="returned") as info:
        enc.encode(IMAGES)
    assert info.value.code == "INTERNAL"


def test_real_client_to_a_closed_port_is_unavailable_with_the_url():
    from harness import free_port

    url = f"127.0.0.1:{free_port()}"
    enc = RemoteEncoders([url], timeout_s=10)
    try:
        with pytest.raises(EncoderCallError, match=f"encoder server {url} unavailable") as info:
            enc.encode(IMAGES)
        assert info.value.code == "UNAVAILABLE"
        assert enc.check(1.0)[url]
    finally:
        enc.close()


# ---- instance index ---------------------------------------------------------------------------------
def test_instance_index():
    cpu = {"instance_group": [{"name": "mm_encoder_0", "count": 3, "kind": "KIND_CPU"}]}
    assert [instance_index(cpu, f"mm_encoder_0_{i}") for i in range(3)] == [0, 1, 2]
    gpus = {"instance_group": [{"name": "m_0", "count": 2, "gpus": [0]}, {"name": "m_1", "count": 2, "gpus": [1]}]}
    assert [instance_index(gpus, n, d) for n, d in [("m_0_0", 0), ("m_0_1", 0), ("m_1_0", 1), ("m_1_1", 1)]] == [
        0,
        1,
        2,
        3,
    ]
    shared = {"instance_group": [{"name": "m_0", "count": 2, "gpus": [2, 3]}]}
    assert sorted(instance_index(shared, f"m_0_{c}", d) for c in (0, 1) for d in (2, 3)) == [0, 1, 2, 3]
    assert instance_index({}, "whatever_5") == 5


# ---- generated repositories -------------------------------------------------------------------------
def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_sources_serve_as_they_are():
    assert set(ROLES) == {"all", "encoder", "language"}
    assert sorted(p.name for p in SOURCES["encoder"].iterdir()) == ["mm_control", "mm_encoder"]
    assert {"mm_language", "mm_pipeline", "mm_control"} <= {p.name for p in SOURCES["language"].iterdir()}
    # the split repositories link the single server's models: one model.py; the encoder server's mm_encoder
    # config is the single server's but for internal_access (language servers call it over the network)
    assert (SOURCES["encoder"] / "mm_encoder" / "1").resolve() == SOURCES["all"] / "mm_encoder" / "1"
    ours = _config(SOURCES["encoder"] / "mm_encoder" / "config.pbtxt")
    single = _config(SOURCES["all"] / "mm_encoder" / "config.pbtxt")
    assert ours.parameters["internal_access"].string_value == "shared_secret"
    assert single.parameters["internal_access"].string_value == "closed"
    ours.parameters["internal_access"].string_value = "closed"
    assert ours == single
    assert (SOURCES["language"] / "mm_language").resolve() == SOURCES["all"] / "mm_language"
    assert _config(SOURCES["language"] / "mm_pipeline" / "config.pbtxt").backend == "python"


def test_build_language_repository(tmp_path):
    repo = build_repository(
        tmp_path / "lang",
        "language",
        language_instances=2,
        parameters={"mm_pipeline": {"encoder_urls": "e:8011"}},
        checkpoint=tmp_path,
    )
    assert instance_count(repo, "mm_language") == 2
    assert instance_count(repo, "mm_pipeline") == 4  # 2 x mm_language by default
    pipeline = _config(repo / "mm_pipeline" / "config.pbtxt")
    assert pipeline.parameters["encoder_urls"].string_value == "e:8011"
    language = _config(repo / "mm_language" / "config.pbtxt")
    assert language.parameters["checkpoint"].string_value == str(tmp_path.resolve())
    assert language.parameters["default_window_tokens"].string_value == "1024"  # the rest as in the source
    assert (repo / "mm_language" / "1").resolve() == (SOURCES["all"] / "mm_language" / "1").resolve()
    assert os.path.islink(repo / "mm_pipeline" / "1")
    # regenerated in place; a directory that was not generated is never removed
    build_repository(repo, "language", pipeline_instances=3)
    assert instance_count(repo, "mm_pipeline") == 3 and instance_count(repo, "mm_language") == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep").write_text("x")
    with pytest.raises(ValueError, match="not generated"):
        build_repository(tmp_path / "mine", "encoder")


def test_build_repository_on_gpus_one_group_per_gpu(tmp_path):
    repo = build_repository(tmp_path / "all", "all", encoder_instances=2, encoder_gpus=[0, 1], language_gpus=[2])
    enc = _config(repo / "mm_encoder" / "config.pbtxt")
    assert [(g.count, list(g.gpus), g.kind) for g in enc.instance_group] == [
        (2, [0], model_config_pb2.ModelInstanceGroup.KIND_GPU),
        (2, [1], model_config_pb2.ModelInstanceGroup.KIND_GPU),
    ]
    assert instance_count(repo, "mm_encoder") == 4 and instance_count(repo, "mm_language") == 1
    assert _config(repo / "mm_pipeline" / "config.pbtxt").backend == "python"  # the BLS pipeline (issue 14)


def test_build_repository_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="role"):
        build_repository(tmp_path / "x", "both")
    with pytest.raises(ValueError, match="encoder_instances"):
        build_repository(tmp_path / "x", "encoder", encoder_instances=0)
    with pytest.raises(ValueError, match="no model mm_language"):
        build_repository(tmp_path / "x", "encoder", models=["mm_language"])
    assert parse_gpus("0, 2") == [0, 2] and parse_gpus("") is None
    for bad in ("a", "0,0", "-1"):
        with pytest.raises(ValueError):
            parse_gpus(bad)


# ---- several images per request, preprocessed by a thread pool -------------------------------------------
@pytest.fixture(scope="module")
def encoder_service(tiny_model_dir):
    from mm_encoder.service import EncoderService
    from mmtransfer import TransferConfig

    service = EncoderService(tiny_model_dir, TransferConfig(pool_blocks=128), encode_threads=3, name="t-enc")
    yield service
    service.close()


def test_threaded_encoding_keeps_prompt_order(encoder_service, tiny_model_dir):
    import io

    from PIL import Image

    from mm_bench.images import make_test_image, tokens_for_image_size

    images = [make_test_image(tokens=t, seed=i, model_dir=tiny_model_dir) for i, t in enumerate((1500, 64, 700, 256))]
    want = [tokens_for_image_size(tiny_model_dir, *Image.open(io.BytesIO(b)).size) for b in images]
    refs = encoder_service.encode(images, "order")
    assert [r.num_tokens for r in refs] == want
    assert encoder_service.pool.used_blocks > 0
    for r in refs:
        encoder_service.sender.discard(r.transfer_id)
    assert encoder_service.pool.used_blocks == 0


@pytest.mark.parametrize("where", ["tower", "publish"])
def test_encoding_failure_frees_everything(encoder_service, tiny_model_dir, monkeypatch, where):
    """The tower call failing, or the third image's publish failing after two were published: the request
    fails with that error and nothing stays allocated."""
    from mm_bench.images import make_test_image

    images = [make_test_image(tokens=256, seed=i, model_dir=tiny_model_dir) for i in range(4)]
    calls = []
    if where == "tower":

        def broken(inputs):
            calls.append(len(inputs))
            raise RuntimeError("vision tower failed")

        monkeypatch.setattr(encoder_service.vision, "encode_batch", broken)
    else:
        real = encoder_service.sender.register

        def broken(*args, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("publish failed")
            return real(*args, **kw)

        monkeypatch.setattr(encoder_service.sender, "register", broken)
    with pytest.raises(RuntimeError, match=f"{'vision tower' if where == 'tower' else 'publish'} failed"):
        encoder_service.encode(images, "fail")
    assert calls == ([4] if where == "tower" else [1, 1, 1])  # one tower call for all four images
    assert encoder_service.pool.used_blocks == 0 and encoder_service.sender.active_transfers == 0


# ---- scripts/serve: role options (no server) ----------------------------------------------------------
@pytest.fixture(scope="module")
def serve_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "serve_script", Path(__file__).resolve().parents[2] / "scripts" / "serve.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(serve_module, *argv):
    args = serve_module.build_parser().parse_args(list(argv))
    serve_module.check_role_options(args)
    return args, serve_module.model_env(args)


def test_serve_role_defaults_and_env(serve_module):
    args, env = _options(
        serve_module,
        "--role",
        "encoder",
        "--control-host",
        "0.0.0.0",
        "--advertise-host",
        "enc.example",
        "--control-port",
        "9500",
        "--encoder-instances",
        "2",
    )
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8010, 8011, 8012)
    assert env["MM_CONTROL_HOST"] == "0.0.0.0" and env["MM_ADVERTISE_HOST"] == "enc.example"
    assert env["MM_CONTROL_PORT"] == "9500"
    args, env = _options(
        serve_module,
        "--role",
        "language",
        "--encoder-url",
        "a:8011",
        "--encoder-url",
        "b:8011",
        "--port-base",
        "8020",
        "--http-port",
        "9000",
    )
    assert (args.http_port, args.grpc_port, args.metrics_port) == (9000, 8021, 8022)
    assert env["MM_ENCODER_URLS"] == "a:8011,b:8011"
    args, env = _options(serve_module)
    assert args.role == "all" and (args.http_port, args.grpc_port) == (8000, 8001) and "MM_ENCODER_URLS" not in env


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--role", "language"], "needs --encoder-url"),
        (["--role", "language", "--encoder-url", "nohost"], "HOST:PORT"),
        (["--role", "language", "--encoder-url", "a:1", "--control-host", "10.0.0.5"], "encoder side"),
        (["--role", "encoder", "--encoder-url", "a:1"], "only for --role language"),
        (["--role", "encoder", "--language-instances", "2"], "language side"),
        (["--role", "encoder", "--demo"], "--demo needs"),
        (["--control-host", "0.0.0.0"], "--advertise-host"),
        (["--encoder-gpus", "0,0"], "distinct"),
        (["--model-repository", "x", "--encoder-instances", "2"], "as they are"),
    ],
)
def test_serve_role_options_refused(serve_module, argv, message):
    with pytest.raises(SystemExit, match=message):
        _options(serve_module, *argv)
