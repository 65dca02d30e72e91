"""mm_openai.images: data: URLs and the http(s) fetch policy, against a real local HTTP server (loopback)."""

from __future__ import annotations

import asyncio
import base64
import http.server
import threading
import time

import pytest

from mm_openai.errors import APIError
from mm_openai.images import FetchPolicy, ImageFetcher, check_address, decode_data_url

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100


class _Handler(http.server.BaseHTTPRequestHandler):
    seen_hosts: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        _Handler.seen_hosts.append(self.headers.get("Host", ""))
        if self.path == "/img.png":
            self._send(200, PNG)
        elif self.path == "/big.png":
            self._send(200, b"x" * 5000)
        elif self.path == "/chunked.png":  # no content-length: the size limit must still hold
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"y" * 5000)
            self.close_connection = True
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/slow.png":
            time.sleep(1.5)
            self._send(200, PNG)
        else:
            self._send(404, b"no")

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the client gave up (the timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def load(url: str, **policy) -> bytes:
    async def run():
        fetcher = ImageFetcher(FetchPolicy(**{"max_bytes": 1000, "timeout_s": 5.0, **policy}))
        try:
            return await fetcher.load(url, "p")
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def refused(url: str, status: int = 400, match: str = "", **policy) -> APIError:
    with pytest.raises(APIError) as info:
        load(url, **policy)
    assert info.value.status == status, info.value.message
    assert match in info.value.message, info.value.message
    return info.value


def test_data_url_decodes():
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert decode_data_url(url, 1000, "p") == PNG
    assert load(url) == PNG


@pytest.mark.parametrize(
    "url, status, match",
    [
        ("data:image/png,rawbytes", 400, "base64"),
        ("data:text/plain;base64,aGk=", 400, "not an image"),
        ("data:image/png;base64,!!!!", 400, "not valid base64"),
        ("data:image/png;base64,", 400, "no data"),
        ("data:image/png;base64," + base64.b64encode(b"x" * 2000).decode(), 413, "larger than"),
    ],
)
def test_bad_data_urls(url, status, match):
    refused(url, status, match)


def test_loopback_fetch_keeps_the_host_header(server):
    base, port = server
    assert load(f"{base}/img.png") == PNG
    _Handler.seen_hosts.clear()
    assert load(f"http://localhost:{port}/img.png") == PNG  # connected to the checked address, Host kept
    assert _Handler.seen_hosts == [f"localhost:{port}"]


def test_loopback_can_be_turned_off(server):
    err = refused(f"{server[0]}/img.png", match="loopback", allow_loopback=False)
    assert err.code == "image_url_not_allowed"


def test_size_limit_by_header_and_by_body(server):
    refused(f"{server[0]}/big.png", 413, "larger than")
    refused(f"{server[0]}/chunked.png", 413, "larger than")


def test_redirects_are_not_followed(server):
    refused(f"{server[0]}/redirect", 400, "redirects are not followed")


def test_http_errors_and_timeout(server):
    refused(f"{server[0]}/missing.png", 400, "HTTP 404")
    refused(f"{server[0]}/slow.png", 400, "longer than", timeout_s=0.5)


@pytest.mark.parametrize(
    "url, match",
    [
        ("file:///etc/passwd", "only data:, http: and https:"),
        ("ftp://127.0.0.1/x.png", "only data:, http: and https:"),
        ("http://user:pw@127.0.0.1/x.png", "credentials"),
        ("http:///x.png", "no host"),
        # refused before any connection is made: nothing is sent to these addresses
        ("http://10.255.255.1/x.png", "allow-list"),
        ("http://8.8.8.8/x.png", "allow-list"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::ffff:169.254.169.254]/x", "link-local"),
        ("http://0.0.0.0:80/x.png", "unspecified"),
    ],
)
def test_urls_refused_by_policy(url, match):
    refused(url, 400, match)


def test_allow_list_never_opens_link_local():
    assert check_address("169.254.169.254", host_allowed=True, allow_loopback=True) is not None
    assert check_address("10.1.2.3", host_allowed=True, allow_loopback=False) is None
    assert check_address("10.1.2.3", host_allowed=False, allow_loopback=True) is not None
    assert check_address("127.0.0.5", host_allowed=False, allow_loopback=True) is None
    assert check_address("::1", host_allowed=False, allow_loopback=False) is not None


def test_host_patterns():
    policy = FetchPolicy(allowed_hosts=("images.example", "*.cdn.example"))
    assert policy.host_allowed("images.example") and policy.host_allowed("IMAGES.EXAMPLE.")
    assert policy.host_allowed("a.cdn.example") and policy.host_allowed("a.b.cdn.example")
    assert not policy.host_allowed("cdn.example") and not policy.host_allowed("evilcdn.example")
    assert not policy.host_allowed("images.example.evil")
