"""The sync client's transport: httpcore's connection pool on connections whose every read and write
waits at most until the call's deadline (service/client/deadline.py). httpx's timeouts are per read, so a
server dripping a byte at a time (its headers too) could otherwise stretch a call forever. Built on
httpcore's public network-backend hook and httpx's public transport interface; nothing of httpx's own
transport is reached into."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpcore
import httpx

from service.client.deadline import _left

# httpcore's errors -> httpx's of the same name, the most specific first (as httpx's own transport maps them)
_ERRORS = tuple((getattr(httpcore, n), getattr(httpx, n)) for n in (
    "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "TimeoutException", "ConnectError", "ReadError",
    "WriteError", "NetworkError", "ProxyError", "UnsupportedProtocol", "LocalProtocolError", "RemoteProtocolError",
    "ProtocolError"))


class DeadlineTransport(httpx.BaseTransport):
    """An httpx transport whose connections keep the running call's deadline."""

    def __init__(self) -> None:
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), network_backend=_DeadlineBackend())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        req = httpcore.Request(request.method, httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                                                            target=url.raw_path),
                               headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        with _as_httpx_errors():
            resp = self._pool.handle_request(req)
        return httpx.Response(resp.status, headers=resp.headers, stream=_ResponseStream(resp.stream),
                              extensions=resp.extensions)

    def close(self) -> None:
        self._pool.close()


class _ResponseStream(httpx.SyncByteStream):
    """The body of an answer, read with httpcore's errors turned into httpx's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._stream

    def close(self) -> None:
        if hasattr(self._stream, "close"):
            self._stream.close()


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as e:  # httpcore's errors mapped; any other re-raised as it is
        theirs = next((t for ours, t in _ERRORS if isinstance(e, ours)), None)
        if theirs is None:
            raise
        raise theirs(str(e)) from e


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write waits at most until the call's deadline: httpx's
    timeouts are per read, so a server dripping a byte at a time could otherwise stretch a call
    forever."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _clip(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _clip(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):  # noqa: ANN001, ANN201
        tls = self._stream.start_tls(ssl_context, server_hostname, _clip(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):  # noqa: ANN001, ANN201
        return _DeadlineStream(self._backend.connect_tcp(host, port, _clip(timeout, httpcore.ConnectTimeout),
                                                         local_address, socket_options))

    def connect_unix_socket(self, path, timeout=None, socket_options=None):  # noqa: ANN001, ANN201
        return _DeadlineStream(self._backend.connect_unix_socket(path, _clip(timeout, httpcore.ConnectTimeout),
                                                                 socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def _clip(timeout: float | None, error: type[Exception]) -> float | None:
    left = _left()
    if left is None:
        return timeout
    if left <= 0:
        raise error("the call's deadline has passed")
    return left if timeout is None else min(timeout, left)

