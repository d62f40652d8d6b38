"""Command line: `python -m service serve --model [ALIAS=]SPEC ... --host H --port P`.

Flags override VIT_* environment variables, which override the defaults in service/config.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from service.config import Settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the HTTP API")
    s.add_argument("--model", dest="models", action="append", metavar="[ALIAS=]SPEC",
                   help="model to serve, repeatable; the first is the default")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    s.add_argument("--max-batch-size", type=int)
    s.add_argument("--max-delay-ms", type=float)
    s.add_argument("--threads", type=int, help="torch intra-op threads")
    s.add_argument("--max-pixels", type=int)
    s.add_argument("--max-upload-mb", type=float)
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from service.app import create_app  # after logging is configured

    try:
        app = create_app(settings)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
