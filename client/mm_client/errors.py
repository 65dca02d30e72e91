"""Exceptions raised by mm_client. Catch ``ClientError`` for all of them."""

from __future__ import annotations


class ClientError(Exception):
    """Base class of every error mm_client raises."""

    exit_code = 1


class ServerUnavailable(ClientError):
    """Nothing answers at the URL (connection refused, unreachable, server not ready)."""

    exit_code = 3

    def __init__(self, url: str, protocol: str = "http", detail: str = ""):
        self.url = url
        self.protocol = protocol
        self.detail = detail
        msg = f"no Triton server answers at {url} ({protocol})"
        if detail:
            msg += f": {detail}"
        msg += "; start one with ./scripts/serve (HTTP on port 8000, gRPC on 8001)"
        super().__init__(msg)


class ServerBusy(ClientError):
    """The server answered UNAVAILABLE for this request (its queue is full, the request waited too long or
    passed its deadline, a transfer pool is exhausted): the request was fine, retry later."""

    exit_code = 5

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"server busy, retry later: {message}")


class ClientTimeout(ClientError):
    """The server did not answer within timeout_s."""

    exit_code = 4


class ServerError(ClientError):
    """The server answered with an error. ``message`` is the server's own text, ``status`` its code."""

    what = "server error"

    def __init__(self, message: str, status: str | None = None):
        self.message = message
        self.status = status
        super().__init__(f"{self.what}{f' [{status}]' if status else ''}: {message}")


class BadRequest(ServerError):
    """The server rejected the request (HTTP 4xx, gRPC INVALID_ARGUMENT/NOT_FOUND/...)."""

    what = "request rejected by the server"


class InvalidInput(ClientError, ValueError):
    """The request could not be built (no images, bad max_tokens, ...); nothing was sent."""

    exit_code = 2


class FileNotFound(InvalidInput, FileNotFoundError):
    """An image file does not exist or cannot be read."""

    def __init__(self, path: str, detail: str = "not found"):
        self.path = path
        ClientError.__init__(self, f"image file {path!r}: {detail}")
