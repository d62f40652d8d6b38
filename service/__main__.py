"""Command line: `python -m service serve --model [ALIAS=]SPEC ... --host H --port P`.

Every setting of service/config.py is a flag (`max_batch_size` -> `--max-batch-size`); flags
override VIT_* environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import uvicorn
from pydantic import ValidationError

from service.config import Settings

log = logging.getLogger("service")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        print(f"error: invalid settings:\n{e}", file=sys.stderr)
        return 2
    from service.api.middleware import configure_logging
    from service.app import create_app

    configure_logging(settings.log_level, settings.log_json)
    try:
        app = create_app(settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, log_config=None, timeout_graceful_shutdown=settings.request_timeout_s)
    _Server(config, app).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
