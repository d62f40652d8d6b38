"""One server process: the app (service/app.py) on uvicorn, with the connection guards of
service/http.py, a raised file-handle limit, and a drain on SIGTERM/SIGINT (readiness 503 while
accepted requests finish). `python -m service serve` runs one (service/cli/serve.py); with
--workers each worker process runs one (service/workers.py)."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Callable

import uvicorn

from service.config import Settings

log = logging.getLogger("service")


class _Server(uvicorn.Server):
    """uvicorn's server, plus: on SIGTERM/SIGINT readiness turns 503 before in-flight work drains."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame) -> None:
        self._app.state.ctx.draining = True
        log.info("signal %s: draining (readiness 503), finishing accepted requests, then exiting", sig)
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises captured signals after its graceful shutdown, which would end the
            # process with -15; a drained SIGTERM is an orderly stop, so exit 0 instead.
            self._captured_signals[:] = [s for s in self._captured_signals if s != signal.SIGTERM]


def raise_file_limit() -> None:
    """Raise the soft file-handle limit to the hard one: every connection holds a handle."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
            soft = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ImportError, ValueError, OSError):
        pass


BACKLOG = 2048  # pending connections the listening socket queues (service/workers.py opens its own)


def connection_limits(settings: Settings) -> dict:
    """uvicorn's settings for hostile connections (docs/proxy.md).

    uvicorn has no header or body read timeout of its own: the protocol class adds the header
    timeout, the header size limit and the connection limit at accept (service/http.py); the
    ASGI middleware times the body. uvicorn's own limit_concurrency stays as a second line,
    a little above --max-connections (it answers 503 to *requests* while that many connections
    are counted, which would otherwise include the connections being refused).
    """
    limits = dict(timeout_keep_alive=settings.keep_alive_s, limit_concurrency=settings.connection_limit + 64,
                  h11_max_incomplete_event_size=int(settings.max_header_kb * 1024), backlog=BACKLOG)
    try:
        import httptools  # noqa: F401
    except ImportError:  # pure-Python h11: its max_incomplete_event_size bounds the headers, no header timeout
        log.warning("httptools is not installed: serving with h11, without a header timeout or accept-time "
                    "connection limit (service/http.py); put a proxy in front that sets them (docs/proxy.md)")
        return {**limits, "http": "h11"}
    from service.http import GuardedHttpToolsProtocol, check_uvicorn

    check_uvicorn()  # ValueError: refuse to serve unguarded
    return {**limits, "http": GuardedHttpToolsProtocol.configured(
        max_connections=settings.connection_limit, header_timeout=settings.read_timeout_s,
        max_header_bytes=int(settings.max_header_kb * 1024))}


def serve(settings: Settings, listen: Callable[[], socket.socket] | None = None) -> int:
    """Run one server process until it is stopped; 2 when the settings name bad models or devices.

    `listen`, with --workers, returns this process's own listening socket (service/workers.py);
    it is called once the app is built, so that the port sends this process connections only
    once it can take them.
    """
    from service.app import create_app
    from service.logs import configure_logging

    raise_file_limit()

    configure_logging(settings.log_level, settings.log_json)
    try:
        app = create_app(settings)
        limits = connection_limits(settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, log_config=None, timeout_graceful_shutdown=settings.request_timeout_s,
                            **limits)
    _Server(config, app).run(sockets=[listen()] if listen else None)
    return 0
