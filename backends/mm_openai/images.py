"""Image URLs of a request -> encoded image bytes (the IMAGE input); decoding stays with mm_encoder.

``data:`` URLs: ``data:<mime>;base64,<payload>``, strict base64, at most ``max_image_bytes`` decoded.

``http(s)://`` URLs are fetched by this server, so the policy is what keeps it from being a proxy into
the network it runs in (SSRF):

- scheme http or https only (``file:``, ``ftp:`` and the rest are refused); no user:password in the URL;
- the host is resolved once, and EVERY resolved address must pass: loopback only when
  ``image_url_loopback`` (default on: a local file server); other addresses only when the host name
  is in the ``image_url_hosts`` allow-list (empty by default, so nothing off this machine is fetched);
  link-local (cloud metadata at 169.254.169.254), multicast, unspecified and reserved addresses never;
- the connection goes to the address that was checked (the URL is rewritten to it, Host header and TLS
  SNI / certificate check keep the name), so a DNS answer that changes between check and connect
  (rebinding) cannot redirect it;
- redirects are not followed (a 3xx is an error), so an allowed host cannot bounce us elsewhere;
- one GET, no cookies or credentials sent, ``image_fetch_timeout_s`` for the whole fetch, the body read
  in chunks and cut at ``max_image_bytes``; only a 200 answer is used. What comes back is only ever
  decoded as an image (Pillow, pixel-count bound) by mm_encoder; it is never echoed to the client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from .errors import APIError, bad_request, too_large

log = logging.getLogger(__name__)
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class FetchPolicy:
    allowed_hosts: tuple[str, ...] = ()
    allow_loopback: bool = True
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        for pattern in self.allowed_hosts:
            if pattern.startswith("*.") and (host.endswith(pattern[1:]) and host != pattern[2:]):
                return True
            if host == pattern:
                return True
        return False


def decode_data_url(url: str, max_bytes: int, param: str) -> bytes:
    """Bytes of a base64 ``data:`` URL; APIError 400 (malformed) or 413 (too large)."""
    m = _DATA_URL.match(url)
    if not m or not m.group("b64"):
        raise bad_request(f"{param}: a data: URL must be data:<type>;base64,<data>", param)
    if m.group("mime") and not m.group("mime").lower().startswith(("image/", "application/octet-stream")):
        raise bad_request(f"{param}: data: URL of type {m.group('mime')!r}, not an image", param)
    payload = url[m.end() :]
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise too_large(f"{param}: image larger than {max_bytes} bytes", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}: the data: URL is not valid base64", param) from None
    if not data:
        raise bad_request(f"{param}: the data: URL holds no data", param)
    if len(data) > max_bytes:
        raise too_large(f"{param}: image larger than {max_bytes} bytes", param)
    return data


def check_address(addr: str, host_allowed: bool, allow_loopback: bool) -> str | None:
    """Why ``addr`` may not be fetched from, or None when it may."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if allow_loopback else "loopback addresses are not allowed (image_url_loopback is off)"
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return f"address {ip} is link-local, multicast, unspecified or reserved"
    return None if host_allowed else "the host is not in the image URL allow-list (image_url_hosts)"


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class ImageFetcher:
    """Fetches http(s) image URLs under a :class:`FetchPolicy`; one shared httpx client."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, cookies=None, timeout=httpx.Timeout(policy.timeout_s)
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def load(self, url: str, param: str) -> bytes:
        """The image bytes behind ``url`` (data: or http(s)); APIError for anything refused or failed."""
        if url[:5].lower() == "data:":
            return decode_data_url(url, self.policy.max_bytes, param)
        try:
            return await asyncio.wait_for(self._fetch(url, param), self.policy.timeout_s)
        except asyncio.TimeoutError:
            raise bad_request(
                f"{param}: fetching the image took longer than {self.policy.timeout_s} s", param, "image_fetch_failed"
            ) from None

    async def _fetch(self, url: str, param: str) -> bytes:
        target, host = await self._checked_target(url, param)
        headers = {"Host": host, "Accept": "image/*"}
        extensions = {"sni_hostname": host.split(":")[0].strip("[]")} if target.startswith("https") else {}
        try:
            async with self._client.stream("GET", target, headers=headers, extensions=extensions) as resp:
                if resp.status_code != 200:
                    where = " (redirects are not followed)" if 300 <= resp.status_code < 400 else ""
                    raise bad_request(
                        f"{param}: fetching the image gave HTTP {resp.status_code}{where}", param, "image_fetch_failed"
                    )
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.policy.max_bytes:
                    raise too_large(f"{param}: image larger than {self.policy.max_bytes} bytes", param)
                chunks, size = [], 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > self.policy.max_bytes:
                        raise too_large(f"{param}: image larger than {self.policy.max_bytes} bytes", param)
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise bad_request(
                f"{param}: fetching the image failed: {type(exc).__name__}", param, "image_fetch_failed"
            ) from None
        return b"".join(chunks)

    async def _checked_target(self, url: str, param: str) -> tuple[str, str]:
        """(URL rewritten to the checked address, original Host header value)."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError:
            raise bad_request(f"{param}: not a valid URL", param) from None
        if parts.scheme.lower() not in ("http", "https"):
            raise bad_request(f"{param}: only data:, http: and https: image URLs are supported", param)
        if parts.username or parts.password:
            raise bad_request(f"{param}: credentials in image URLs are not allowed", param)
        host = parts.hostname
        if not host:
            raise bad_request(f"{param}: the URL has no host", param)
        try:
            addrs = await resolve(host, port)
        except (OSError, UnicodeError):
            raise bad_request(f"{param}: cannot resolve host {host!r}", param, "image_fetch_failed") from None
        allowed = self.policy.host_allowed(host)
        for addr in addrs:
            why = check_address(addr, allowed, self.policy.allow_loopback)
            if why:
                log.info("image URL refused: %s (%s resolves to %s: %s)", url[:200], host, addr, why)
                raise APIError(
                    400,
                    f"{param}: image URL not allowed: {why}",
                    "invalid_request_error",
                    param,
                    "image_url_not_allowed",
                )
        ip = ipaddress.ip_address(addrs[0].split("%", 1)[0])
        netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        host_header = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, "")), host_header
