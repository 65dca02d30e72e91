"""mm_openai request parsing, error mapping, config and response objects (no server)."""

from __future__ import annotations

import json

import pytest

from mm_openai.__main__ import config_from_args
from mm_openai.config import ServerConfig, from_env
from mm_openai.errors import APIError, from_triton
from mm_openai.responses import SSE_DONE, CompletionIds, Usage, chunk, completion, sse, usage_chunk
from mm_openai.schema import parse_body
from mm_openai.triton import build_inputs


def body(**kw) -> bytes:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    base.update(kw)
    return json.dumps(base).encode()


def parse(raw: bytes, limit: int = 100):
    return parse_body(raw, max_tokens_limit=limit, max_images=4)


def test_full_request_is_converted():
    req = parse(
        body(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                        {"type": "text", "text": "What?"},
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}},
                    ],
                },
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "More?"},
            ],
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=5,
            seed=3,
            stop="END",
            n=1,
            user="u",
            unknown_new_field=1,
        )
    )
    assert req.messages.messages[0] == {"role": "system", "content": "Be brief."}
    assert req.messages.messages[1]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "What?"},
        {"type": "image"},
    ]
    assert [s.url for s in req.images] == ["data:image/png;base64,AAAA", "http://127.0.0.1:1/a.png"]
    assert req.images[1].param == "messages[1].content[2].image_url.url"
    assert req.stream and req.include_usage
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (7, 0.5, 0.9, 5, 3, ("END",))


def test_defaults_leave_everything_to_the_model():
    req = parse(body())
    assert not req.stream and not req.include_usage and req.images == ()
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (None, None, None, None, None, ())


@pytest.mark.parametrize(
    "raw, param, match",
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1]", None, "JSON object"),
        (body(model=None), "model", "string"),
        (body(messages=[]), "messages", "at least 1"),
        (body(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "Input should be"),
        (
            body(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
            "messages[0].content[0].text",
            "string",
        ),
        (body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]), "messages[0].content[0]", "tag"),
        (body(messages=[{"role": "user", "content": None}]), "messages[0].content", "required"),
        (body(messages=[{"role": "user", "content": "x <|vision_start|>"}]), "messages", "reserved vision token"),
        (body(max_tokens=0), "max_tokens", r"\[1, 100\]"),
        (body(max_tokens=101), "max_tokens", r"\[1, 100\]"),
        (body(max_completion_tokens=1000), "max_completion_tokens", r"\[1, 100\]"),
        (body(max_tokens=5, max_completion_tokens=6), "max_completion_tokens", "differ"),
        (body(max_tokens=True), "max_tokens", "integer"),
        (body(max_tokens="5"), "max_tokens", "integer"),
        (body(temperature=2.5), "temperature", "less than or equal"),
        (body(top_p=0), "top_p", "greater than"),
        (body(top_k=-2), "top_k", "greater than"),
        (body(seed=-1), "seed", "2\\*\\*63"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
        (body(stop=[""]), "stop", "non-empty"),
        (body(n=2), "n", "only n=1"),
        (body(logprobs=True), "logprobs", "not supported"),
        (body(presence_penalty=0.5), "presence_penalty", "not supported"),
        (body(tools=[{"type": "function"}]), "tools", "not supported"),
        (body(response_format={"type": "json_object"}), "response_format", "text"),
        (
            body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}] * 5}]),
            "messages",
            "at most 4 images",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_param(raw, param, match):
    with pytest.raises(APIError) as info:
        parse(raw)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.param == param
    assert pytest.importorskip("re").search(match, err.message), err.message
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_top_k_minus_one_or_zero_means_off():
    assert parse(body(top_k=-1)).sampling.top_k is None
    assert parse(body(top_k=0)).sampling.top_k is None


@pytest.mark.parametrize(
    "status, message, http",
    [
        ("StatusCode.INVALID_ARGUMENT", "invalid input: IMAGE[0]: not an image", 400),
        ("StatusCode.UNAVAILABLE", "unavailable (pool_exhausted): ...", 503),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", 504),
        ("StatusCode.INTERNAL", "internal error (RuntimeError): x", 500),
        ("StatusCode.NOT_FOUND", "Request for unknown model", 404),
        (None, "in ensemble 'mm_pipeline_stream', [request id: abc] invalid input: PROMPT: bad", 400),
        (None, "unavailable (queue_full): the engine's queue is full", 503),
        (None, "something odd", 500),
    ],
)
def test_triton_errors_map_to_http_status(status, message, http):
    err = from_triton(status, message)
    assert err.status == http
    assert "request id" not in err.message and "in ensemble" not in err.message


def test_config_validation_and_env():
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=0)
    with pytest.raises(ValueError, match="image_url_hosts"):
        ServerConfig(image_url_hosts=("http://x.example/",))
    with pytest.raises(ValueError, match="stream_via"):
        ServerConfig(stream_via="carrier-pigeon")
    cfg = from_env(
        environ={
            "MM_OPENAI_PORT": "9100",
            "MM_OPENAI_IMAGE_URL_HOSTS": "a.example, *.cdn.example",
            "MM_OPENAI_IMAGE_URL_LOOPBACK": "off",
            "MM_OPENAI_REQUEST_TIMEOUT_S": "5",
        }
    )
    assert (cfg.port, cfg.image_url_hosts, cfg.image_url_loopback, cfg.request_timeout_s) == (
        9100,
        ("a.example", "*.cdn.example"),
        False,
        5.0,
    )
    with pytest.raises(ValueError, match="MM_OPENAI_IMAGE_URL_LOOPBACK"):
        from_env(environ={"MM_OPENAI_IMAGE_URL_LOOPBACK": "maybe"})


def test_cli_flags_win_over_env(monkeypatch):
    monkeypatch.setenv("MM_OPENAI_PORT", "9100")
    cfg = config_from_args(["--port", "9200", "--triton-url", "h:1", "--no-image-url-loopback"])
    assert (cfg.port, cfg.triton_url, cfg.image_url_loopback) == (9200, "h:1", False)
    assert config_from_args([]).port == 9100
    with pytest.raises(SystemExit, match="max_images"):
        config_from_args(["--max-images", "0"])


def test_response_objects_have_openai_shape():
    ids = CompletionIds("chatcmpl-x", "m", created=1)
    usage = Usage(10, 3)
    full = completion(ids, "hello", "stop", usage)
    assert full["object"] == "chat.completion" and full["choices"][0]["message"] == {
        "role": "assistant",
        "content": "hello",
    }
    assert full["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    c = chunk(ids, {"content": "he"}, None, include_usage=True)
    assert c["object"] == "chat.completion.chunk" and c["usage"] is None
    assert "usage" not in chunk(ids, {}, "length")
    assert usage_chunk(ids, usage)["choices"] == []
    framed = sse(c)
    assert framed.startswith(b"data: {") and framed.endswith(b"\n\n") and json.loads(framed[6:]) == c
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_inputs_send_only_what_the_client_set():
    greedy = parse(body(temperature=0, top_p=1.0)).sampling
    names = [t.name() for t in build_inputs([], "[]", greedy)]
    assert names == ["IMAGE", "MESSAGES"]
    sampled = parse(body(temperature=0.7, top_p=0.5, top_k=3, seed=1, max_tokens=4, stop=["x", "y"])).sampling
    inputs = {t.name(): t for t in build_inputs([b"img1", b"img2"], "[]", sampled)}
    assert set(inputs) == {"IMAGE", "MESSAGES", "MAX_TOKENS", "TEMPERATURE", "TOP_P", "TOP_K", "SEED", "STOP"}
    assert inputs["IMAGE"].shape() == [2] and inputs["STOP"].shape() == [2]
    assert inputs["SEED"].datatype() == "INT64" and inputs["TEMPERATURE"].datatype() == "FP32"
    assert build_inputs([], "[]", greedy)[0].shape() == [0]  # text-only: IMAGE of shape [0]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=15,
)
_fields = st.sampled_from(
    [
        "model",
        "messages",
        "stream",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "n",
        "stream_options",
        "response_format",
        "tools",
    ]
)


@settings(max_examples=300, deadline=None)
@given(extra=st.dictionaries(_fields, _values, max_size=4), raw=st.binary(max_size=40))
def test_property_any_body_gives_a_request_or_a_400(extra, raw):
    for data in (body(**extra), raw):
        try:
            parse(data)
        except APIError as err:
            assert err.status == 400 and err.message
