"""Which encoder endpoints ``mm_language`` may connect to: a stranger's address in an EMBED_REF is refused
before any connection.

Trusted are:
- the control endpoints of this server's own encoder instances: each ``mm_encoder`` instance registers its
  advertised address when it starts, in a per-server registry (a 0700 directory of this user, named after the
  tritonserver process, like the internal secret of :mod:`mm_triton.access`);
- the endpoints that the ``--encoder-url`` servers advertise: a language server's ``mm_pipeline``
  (:mod:`mm_remote`) registers the address of every EMBED_REF an encoder server returned to it, before
  handing the refs to ``mm_language``;
- ``trusted_encoders`` (parameter / ``MM_TRUSTED_ENCODERS``): comma-separated ``host:port`` or ``host:*``,
  for deployments that route refs some other way.

The check is per ref, on the parsed address only (no DNS); an untrusted ref fails the request with INVALID_ARG
and nothing is pulled or aborted. The number of refs per request is bounded before parsing (16, as images).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from mm_triton.access import register_endpoint, registry_dir  # noqa: F401 - register_endpoint re-exported
from mmtransfer import EmbedRef


def _patterns(raw: str) -> tuple[set[str], set[str]]:
    exact, any_port = set(), set()
    for item in (x.strip() for x in raw.split(",") if x.strip()):
        host, sep, port = item.removeprefix("tcp://").rpartition(":")
        if not sep or not host or not (port == "*" or port.isdigit()):
            raise ValueError(f"trusted_encoders: {item!r} is not host:port or host:*")
        (any_port.add(host) if port == "*" else exact.add(f"tcp://{host}:{port}"))
    return exact, any_port


class TrustedEndpoints:
    def __init__(self, directory: Path | None, configured: str = "") -> None:
        self._dir = directory
        self._exact, self._any_port = _patterns(configured)
        self._known: set[str] = set()

    @classmethod
    def for_model(cls, params: Mapping[str, str]) -> TrustedEndpoints:
        configured = os.environ.get("MM_TRUSTED_ENCODERS") or params.get("trusted_encoders") or ""
        return cls(registry_dir(), configured)

    def _rescan(self) -> None:
        """Re-read the registry (a handful of small files): on every miss, so an endpoint registered a moment
        ago is never refused; a stranger's refs cost one directory listing each (at most 16 per request)."""
        if self._dir is None:
            return
        known = set()
        for entry in self._dir.iterdir():
            if not entry.name.startswith("."):
                try:
                    known.add(entry.read_text().strip())
                except OSError:
                    continue
        self._known = known

    def trusted(self, address: str) -> bool:
        host = address.removeprefix("tcp://").rpartition(":")[0]
        if address in self._exact or host in self._any_port or address in self._known:
            return True
        self._rescan()
        return address in self._known

    def check(self, raw_refs: Sequence[bytes | str]) -> None:
        """ValueError naming the first ref whose endpoint is not trusted; malformed refs are left to the
        service's parser (its messages)."""
        for i, raw in enumerate(raw_refs):
            try:
                address = EmbedRef.from_json(raw).address
            except Exception:  # noqa: BLE001 - reported by LanguageService.parse_refs
                continue
            if not self.trusted(address):
                raise ValueError(
                    f"EMBED_REF[{i}]: endpoint {address} is not one of this server's encoders "
                    "(trusted_encoders): refused before any connection"
                )

    def only_trusted(self, raw_refs: Sequence[bytes | str]) -> list[bytes | str]:
        out = []
        for raw in raw_refs:
            try:
                if self.trusted(EmbedRef.from_json(raw).address):
                    out.append(raw)
            except Exception:  # noqa: BLE001 - nothing to abort for a malformed ref
                continue
        return out
