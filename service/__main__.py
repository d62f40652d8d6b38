"""Command line: `python -m service serve --model [ALIAS=]SPEC ... --host H --port P`, and
`python -m service explain IMAGE... --method M [--param value ...] -o OUT` (service/cli/explain.py).

Every setting of service/config.py is a flag (`max_batch_size` -> `--max-batch-size`); flags
override VIT_* environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from collections.abc import Callable

import uvicorn
from pydantic import ValidationError

from service.config import Settings

log = logging.getLogger("service")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("explain", add_help=False,
                   help="run a method over images, through a server or in process (python -m service explain --help)")
    sub.add_parser("compare", add_help=False,
                   help="compare method settings on one image by their faithfulness (python -m service compare --help)")
    sub.add_parser("ray", add_help=False,
                   help="serve the HTTP API on Ray Serve, locally or on a cluster (pip install .[ray]; python -m service ray --help)")
    s = sub.add_parser("serve", help="serve the HTTP API")
    s.add_argument("--model", dest="models", action="append", metavar="[ALIAS=]SPEC",
                   help="model to serve, repeatable; the first available is the default (env VIT_MODELS)")
    for name, field in Settings.model_fields.items():
        if name == "models":
            continue
        flag = "--" + name.replace("_", "-")
        env = f"env VIT_{name.upper()}"
        helptext = f"{field.description or ''} ({env})".strip()
        if field.annotation is bool:
            s.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif name == "cors_origins":
            s.add_argument(flag, dest=name, help=f"comma-separated {helptext}")
        else:
            s.add_argument(flag, dest=name, help=helptext)
    return p


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
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass


def connection_limits(settings: Settings) -> dict:
    """uvicorn's settings for hostile connections (README, Under load and faults).

    uvicorn has no header or body read timeout of its own: the protocol class adds the header
    timeout, the header size limit and the connection limit at accept (service/http.py); the
    ASGI middleware times the body. uvicorn's own limit_concurrency stays as a second line,
    a little above --max-connections (it answers 503 to *requests* while that many connections
    are counted, which would otherwise include the connections being refused).
    """
    limits = dict(timeout_keep_alive=settings.keep_alive_s, limit_concurrency=settings.connection_limit + 64,
                  h11_max_incomplete_event_size=int(settings.max_header_kb * 1024), backlog=2048)
    try:
        import httptools  # noqa: F401

        from service.http import GuardedHttpToolsProtocol
    except ImportError:  # pure-Python h11: its max_incomplete_event_size bounds the headers, no header timeout
        log.warning("httptools is not installed: serving with h11, without a header timeout or accept-time connection limit")
        return {**limits, "http": "h11"}
    return {**limits, "http": GuardedHttpToolsProtocol.configured(
        max_connections=settings.connection_limit, header_timeout=settings.read_timeout_s,
        max_header_bytes=int(settings.max_header_kb * 1024))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["explain"]:
        from service.cli import explain as cli

        return cli.main(argv[1:])
    if argv[:1] == ["compare"]:
        from service.cli import compare as cli_compare

        return cli_compare.main(argv[1:])
    if argv[:1] == ["ray"]:
        from service import ray_serve

        return ray_serve.main(argv[1:])
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"error: invalid settings:\n{e}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        from service import workers

        return workers.supervise(settings)
    return serve(settings)


def serve(settings: Settings, listen: Callable[[], socket.socket] | None = None) -> int:
    """Run one server process until it is stopped; 2 when the settings name bad models or devices.

    `listen`, with --workers, returns this process's own listening socket (service/workers.py);
    it is called once the app is built, so that the port sends this process connections only
    once it can take them.
    """
    from service.api.middleware import configure_logging
    from service.app import create_app

    raise_file_limit()

    configure_logging(settings.log_level, settings.log_json)
    try:
        app = create_app(settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, log_config=None, timeout_graceful_shutdown=settings.request_timeout_s,
                            **connection_limits(settings))
    _Server(config, app).run(sockets=[listen()] if listen else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
