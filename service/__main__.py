"""python -m service COMMAND ...: serve, explain, compare or ray, each run by its own module
(COMMANDS); `python -m service COMMAND --help` lists its flags."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": ("service.cli.serve", "serve the HTTP API (python -m service serve --help)"),
    "explain": ("service.cli.explain", "run a method over images, through a server or in process "
                               "(python -m service explain --help)"),
    "compare": ("service.cli.compare", "compare method settings on one image by their faithfulness "
                                       "(python -m service compare --help)"),
    "ray": ("service.cli.ray", "serve the HTTP API on Ray Serve, locally or on a cluster "
                               "(pip install .[ray]; python -m service ray --help)"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, helptext) in COMMANDS.items():
        sub.add_parser(name, add_help=False, help=helptext)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in COMMANDS:
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    _parser().parse_args(argv)  # --help, or an error naming the commands (exit 2)
    return 2


if __name__ == "__main__":
    sys.exit(main())
