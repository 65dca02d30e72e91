"""mm-client CLI and MMClient: argument handling and error paths (no server needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import REPO_ROOT, free_port
from mm_client import (
    BadRequest,
    ClientError,
    ClientTimeout,
    FileNotFound,
    GenerateResult,
    InvalidInput,
    MMClient,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    StreamChunk,
    cli,
    demo_image,
)
from mm_client.client import normalize_url, read_image


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def dead_url() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(demo_image(32, 32))
    return path


class FakeClient:
    """Replaces MMClient in cli: records the call, returns a canned result or raises."""

    calls: list = []
    raise_exc: BaseException | None = None

    def __init__(self, url, protocol="http", timeout_s=120.0, model="mm_pipeline"):
        self.url, self.protocol, self.timeout_s, self.model = url, protocol, timeout_s, model
        self.display_url = url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def is_ready(self):
        return True

    def generate(self, images, prompt, max_tokens=None):
        FakeClient.calls.append(
            dict(
                url=self.url,
                protocol=self.protocol,
                timeout_s=self.timeout_s,
                model=self.model,
                images=list(images),
                prompt=prompt,
                max_tokens=max_tokens,
            )
        )
        if FakeClient.raise_exc:
            raise FakeClient.raise_exc
        return GenerateResult(
            text="a red house",
            token_ids=[5, 6, 7],
            latency_s=0.25,
            finish_reason="length",
            prompt_tokens=40,
            completion_tokens=3,
        )

    def generate_stream(self, images, prompt, max_tokens=None, on_chunk=None, model="mm_pipeline_stream"):
        FakeClient.calls.append(
            dict(
                url=self.url,
                protocol=self.protocol,
                model=model,
                images=list(images),
                prompt=prompt,
                max_tokens=max_tokens,
                stream=True,
            )
        )
        chunks = [StreamChunk("a red", [5, 6], False), StreamChunk(" house", [7], True, "length", 40, 3)]
        for chunk in chunks:
            if on_chunk is not None:
                on_chunk(chunk)
        return GenerateResult(
            text="a red house",
            token_ids=[5, 6, 7],
            latency_s=0.25,
            finish_reason="length",
            prompt_tokens=40,
            completion_tokens=3,
            ttft_s=0.1,
        )


@pytest.fixture
def fake(monkeypatch):
    FakeClient.calls = []
    FakeClient.raise_exc = None
    monkeypatch.setattr(cli, "MMClient", FakeClient)
    return FakeClient


# ------------------------------------------------------------------------------------------- parsing
def test_help_lists_everything(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in (
        "--url",
        "--protocol",
        "--max-tokens",
        "--prompt",
        "--json",
        "--demo-image",
        "--timeout",
        "--model",
        "--ready",
        "exit codes",
        "scripts/serve",
    ):
        assert opt in out


def test_defaults_and_pass_through(capsys, fake, png):
    code, out, err = run_cli(capsys, str(png))
    assert code == 0 and out == "a red house\n" and err == ""
    call = fake.calls[-1]
    assert call["url"] == "localhost:8000" and call["protocol"] == "http" and call["max_tokens"] is None
    assert call["prompt"] == cli.DEFAULT_PROMPT and call["images"] == [str(png)] and call["model"] == "mm_pipeline"


def test_grpc_default_port_and_options(capsys, fake, png):
    code, _, _ = run_cli(
        capsys,
        "--protocol",
        "grpc",
        "--max-tokens",
        "16",
        "--prompt",
        "Describe",
        "--timeout",
        "7.5",
        "--model",
        "m2",
        str(png),
        str(png),
    )
    assert code == 0
    call = fake.calls[-1]
    assert call["url"] == "localhost:8001" and call["protocol"] == "grpc" and call["max_tokens"] == 16
    assert call["timeout_s"] == 7.5 and call["model"] == "m2" and len(call["images"]) == 2


def test_demo_image_goes_first(capsys, fake, png):
    code, _, _ = run_cli(capsys, "--demo-image", "--url", "h:9", str(png))
    assert code == 0
    images = fake.calls[-1]["images"]
    assert isinstance(images[0], bytes) and images[0].startswith(b"\xff\xd8") and images[1] == str(png)  # a JPEG photo


def test_json_output(capsys, fake, png):
    code, out, _ = run_cli(capsys, "--json", "--url", "localhost:9000", str(png))
    assert code == 0
    obj = json.loads(out)
    assert obj == {
        "text": "a red house",
        "token_ids": [5, 6, 7],
        "latency_s": 0.25,
        "images": 1,
        "url": "localhost:9000",
        "protocol": "http",
        "finish_reason": "length",
        "prompt_tokens": 40,
        "completion_tokens": 3,
        "image_tokens": [],
    }


def test_stream_prints_chunks_as_they_come_over_grpc(capsys, fake, png):
    code, out, _ = run_cli(capsys, "--stream", "--max-tokens", "3", str(png))
    assert code == 0 and out == "a red house\n"
    call = fake.calls[-1]
    assert call["stream"] and call["protocol"] == "grpc" and call["url"] == "localhost:8001"
    assert call["model"] == "mm_pipeline_stream" and call["max_tokens"] == 3
    code, out, _ = run_cli(capsys, "--stream", "--json", str(png))
    obj = json.loads(out)
    assert obj["ttft_s"] == 0.1 and obj["finish_reason"] == "length" and obj["token_ids"] == [5, 6, 7]


def test_stream_needs_grpc_in_the_library():
    with pytest.raises(InvalidInput, match="grpc"):
        next(MMClient("h:1", protocol="http").stream([b"x"], "p"))


def test_server_busy_is_not_no_server():
    from tritonclient.utils import InferenceServerException

    e = MMClient("h:1", protocol="grpc")._translate(
        InferenceServerException("unavailable (queue_full): 64 sequences are waiting", status="StatusCode.UNAVAILABLE")
    )
    assert isinstance(e, ServerBusy) and e.exit_code == 5 and "queue_full" in str(e)


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-tokens", "0", "x.png"],
        ["--max-tokens", "-3", "x.png"],
        ["--max-tokens", "ten", "x.png"],
        ["--protocol", "udp", "x.png"],
        ["--timeout", "0", "x.png"],
        ["--no-such-option"],
    ],
)
def test_bad_arguments_exit_2(capsys, fake, argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
    assert fake.calls == []


def test_no_image_is_a_usage_error(capsys, fake):
    code, out, err = run_cli(capsys, "--prompt", "hi")
    assert code == 2 and out == ""
    assert err.startswith("mm-client: error: no image given") and err.count("\n") == 1
    assert fake.calls == []


# ---------------------------------------------------------------------------------- error paths
def test_missing_file_exit_2_before_contacting_server(capsys, tmp_path):
    missing = tmp_path / "nope.png"
    code, out, err = run_cli(capsys, "--url", dead_url(), str(missing))
    assert code == 2 and out == ""
    assert err == f"mm-client: error: image file {str(missing)!r}: not found\n"


def test_directory_as_image(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--url", dead_url(), str(tmp_path))
    assert code == 2 and "is a directory" in err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_server_down_exit_3_with_hint(capsys, png, protocol):
    url = dead_url()
    code, out, err = run_cli(capsys, "--protocol", protocol, "--url", url, "--timeout", "5", str(png))
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and err.startswith("mm-client: error: no Triton server answers at ")
    assert url in err and "./scripts/serve" in err and "Traceback" not in err


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_ready_when_server_down(capsys, protocol):
    code, out, err = run_cli(capsys, "--ready", "--protocol", protocol, "--url", dead_url(), "--timeout", "5")
    assert code == 3 and "not ready" in err and "./scripts/serve" in err


@pytest.mark.parametrize(
    "exc, code, text",
    [
        (BadRequest("unknown image format", "400"), 1, "request rejected by the server [400]: unknown image format"),
        (ServerError("CUDA out of memory", "500"), 1, "server error [500]: CUDA out of memory"),
        (ClientTimeout("no answer from x within 1 s"), 4, "no answer from x within 1 s"),
        (ServerUnavailable("h:1", "http"), 3, "no Triton server answers at h:1"),
        (InvalidInput("max_tokens must be a positive integer"), 2, "max_tokens must be"),
    ],
)
def test_client_errors_map_to_exit_codes(capsys, fake, png, exc, code, text):
    fake.raise_exc = exc
    rc, out, err = run_cli(capsys, str(png))
    assert rc == code and out == ""
    assert err.startswith("mm-client: error: ") and text in err and err.count("\n") == 1


def test_bad_url(capsys, png):
    code, _, err = run_cli(capsys, "--url", "localhost:abc", str(png))
    assert code == 2 and "bad port" in err


def test_console_script_and_wrapper_run(tmp_path):
    """The installed entry point and scripts/client both start and report a missing file the same way."""
    missing = str(tmp_path / "missing.jpg")
    r = subprocess.run(
        [sys.executable, "-m", "mm_client", "--url", dead_url(), missing], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and r.stderr.strip().endswith("not found")
    r = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "client"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "--demo-image" in r.stdout


# ------------------------------------------------------------------------------------- the library
def test_normalize_url():
    assert normalize_url("localhost", "http") == ("localhost:8000", False)
    assert normalize_url("localhost", "grpc") == ("localhost:8001", False)
    assert normalize_url("http://10.0.0.1:9000/", "http") == ("10.0.0.1:9000", False)
    assert normalize_url("https://h:443", "http") == ("h:443", True)
    for bad in ("", "http://", "h:1/v2", "h:x"):
        with pytest.raises(InvalidInput):
            normalize_url(bad, "http")


def test_read_image(tmp_path, png):
    assert read_image(b"abc") == b"abc"
    assert read_image(png) == png.read_bytes() == read_image(str(png))
    with pytest.raises(FileNotFound) as exc:
        read_image(tmp_path / "x.png")
    assert isinstance(exc.value, FileNotFoundError) and isinstance(exc.value, ClientError)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(InvalidInput):
        read_image(123)


def test_generate_validates_before_sending(png):
    client = MMClient(dead_url(), timeout_s=2)
    with pytest.raises(InvalidInput, match="at least one image"):
        client.generate([], "p")
    for bad in (0, -1, 2.5, True, 2**31):
        with pytest.raises(InvalidInput, match="max_tokens"):
            client.generate([png], "p", max_tokens=bad)
    with pytest.raises(InvalidInput, match="protocol"):
        MMClient("h:1", protocol="tcp")
    with pytest.raises(ServerUnavailable) as exc:
        client.generate(png, "p")  # a single path is accepted too
    assert exc.value.url.endswith(client.url) and exc.value.protocol == "http"
    assert client.is_ready() is False


def test_translate_server_exceptions():
    from tritonclient.utils import InferenceServerException

    client = MMClient("h:1", protocol="grpc")
    e = client._translate(
        InferenceServerException("Request for unknown model: 'mm_pipeline' is not found", status="StatusCode.NOT_FOUND")
    )
    assert isinstance(e, BadRequest) and "is the model repository" in str(e)
    e = client._translate(InferenceServerException("bad image", status="StatusCode.INVALID_ARGUMENT"))
    assert isinstance(e, BadRequest) and e.message == "bad image"
    e = client._translate(InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"))
    assert isinstance(e, ClientTimeout)
    e = client._translate(InferenceServerException("boom", status="StatusCode.INTERNAL"))
    assert type(e) is ServerError and e.message == "boom"
    e = client._translate(InferenceServerException("connect failed", status="StatusCode.UNAVAILABLE"))
    assert isinstance(e, ServerUnavailable)
    http = MMClient("h:1", protocol="http")
    assert isinstance(http._translate(InferenceServerException("x", status="400")), BadRequest)
    assert type(http._translate(InferenceServerException("x", status="500"))) is ServerError
    assert isinstance(http._translate(TimeoutError("timed out")), ClientTimeout)
    assert isinstance(http._translate(ConnectionResetError(104, "Connection reset by peer")), ServerUnavailable)
