"""Settings <-> command-line flags, for every command line that serves (`python -m service serve`,
`python -m service ray`).

Every field of service/config.py Settings is a flag (`max_batch_size` -> `--max-batch-size`,
`models` -> `--model`, repeatable; a bool -> `--log-json` / `--no-log-json`). A flag left out
is None in the parsed arguments and is no override: the VIT_* environment, then the default,
applies.
"""

from __future__ import annotations

import argparse
from typing import Any

from service.config import Settings


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per Settings field to `parser`; each flag's dest is the field's name."""
    parser.add_argument("--model", dest="models", action="append", metavar="[ALIAS=]SPEC",
                        help="model to serve, repeatable; the first available is the default (env VIT_MODELS)")
    for name, field in Settings.model_fields.items():
        if name == "models":
            continue
        flag = "--" + name.replace("_", "-")
        helptext = f"{field.description or ''} (env VIT_{name.upper()})".strip()
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif name == "cors_origins":
            parser.add_argument(flag, dest=name, help=f"comma-separated {helptext}")
        else:
            parser.add_argument(flag, dest=name, help=helptext)


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Parsed arguments -> the Settings fields given on the command line (Settings(**them) validates)."""
    return {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
