"""`python -m service serve --model [ALIAS=]SPEC ... --host H --port P`: serve the HTTP API.

Every setting of service/config.py is a flag (`max_batch_size` -> `--max-batch-size`); flags
override VIT_* environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from service.config import Settings
from service.flags import add_settings_flags, settings_overrides


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings(**settings_overrides(args))
    except ValidationError as e:
        print(f"error: invalid settings:\n{e}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        from service import workers

        return workers.supervise(settings)
    from service.server import serve

    return serve(settings)
