"""`python -m service compare IMAGE --setting "METHOD [name=value ...]" ... [-o OUT.json]`

Compares method settings on one image by how faithful their maps are (POST /compare): each
setting's deletion and insertion areas, printed as a table, best first (lowest deletion area;
for `--order least`, highest). Through a running service (`--server URL`) or in this process
(`--model SPEC`, the service's own engine, no server). `-o` also writes the whole JSON answer.

    python -m service compare cat.png --setting "rollout head_fusion=max discard_ratio=0.9" \\
        --setting "rollout head_fusion=min start_layer=2" --setting "grad-rollout category_id=281" \\
        --setting "gae category_id=281" --server http://127.0.0.1:8000

Exit codes as `python -m service explain`: 0 done, 2 bad arguments, 3 unreachable, 4 refused, 5 failed.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from schemas import requests as rq
from service.cli import DEADLINE_S, FAILED, OK, REFUSED, UNREACHABLE, USAGE, Refused, positive
from service.methods.compare import MAX_SETTINGS, comparable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--setting", action="append", required=True, metavar='"METHOD [name=value ...]"',
                   help=f"a method and its parameters, repeatable ({', '.join(comparable())})")
    p.add_argument("--faithfulness-steps", type=int, help="k: curve points after the first (service default 16)")
    p.add_argument("--removal", choices=["blur", "mean"], help="what a removed patch becomes (default blur)")
    p.add_argument("--order", choices=["most", "least"], help="most relevant patches first (default) or least")
    p.add_argument("-o", "--out", type=Path, help="also write the JSON answer here")
    p.add_argument("--server", help="URL of a running service, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="X-API-Key for --server")
    p.add_argument("--model", help="with --server: a served model alias; without: a model [ALIAS=]SPEC to load "
                                   "in this process (default: the bundled shapes-vit demo model)")
    p.add_argument("--device", default="cpu", help="device for the in-process engine (default cpu)")
    p.add_argument("--deadline", type=positive, default=DEADLINE_S, metavar="S",
                   help="with --server: the longest the comparison may take, from the first connection to the "
                        "last byte of its answer, retries and their waits included (default 600; the server's "
                        "own --request-timeout-s ends its work sooner, 60 by default)")
    return p


def setting(text: str) -> dict[str, Any]:
    """"grad-rollout category_id=7 head_fusion=max" -> {"method": "grad-rollout", "params": {...}}."""
    words = shlex.split(text)
    if not words:
        raise Refused(USAGE, "an empty --setting")
    params = {}
    for w in words[1:]:
        name, eq, value = w.partition("=")
        if not eq or not name:
            raise Refused(USAGE, f"--setting {text!r}: {w!r} is not name=value")
        params[name.replace("-", "_")] = value
    return {"method": words[0], "params": params}


def table(answer: dict[str, Any], labels: list[str]) -> str:
    """The ranking: rank, setting, deletion and insertion areas, explained class."""
    rows = [("rank", "setting", "deletion", "insertion", "class")]
    for rank, i in enumerate(answer["ranking"], 1):
        f = answer["results"][i]["faithfulness"]
        rows.append((str(rank), labels[i], f"{f['deletion_auc']:.3f}", f"{f['insertion_auc']:.3f}", str(f["class_id"])))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    return "\n".join("  ".join(v.ljust(w) if c == 1 else v.rjust(w) if c else v.ljust(w)
                               for c, (v, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def _remote(args, settings: list[dict[str, Any]]) -> dict[str, Any]:
    from service.client import Client, ServiceError

    options = dict(faithfulness_steps=args.faithfulness_steps, removal=args.removal, order=args.order, model=args.model)
    try:
        with Client(args.server, api_key=args.api_key, retries=5, deadline=args.deadline) as c:
            return c.compare(args.image, settings, **options).raw
    except ServiceError as e:
        raise Refused(REFUSED if e.status < 500 else FAILED, f"{args.image}: {e.status}: {e.detail}") from None


def _local(args, settings: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    from service import imaging, models
    from service.config import DEFAULT_MODELS
    from service.engine.engine import Engine
    from service.methods import compare as cmp

    try:
        spec = models.ModelSpec.parse(args.model or DEFAULT_MODELS[-1])
    except ValueError as e:  # an unknown source: a usage error, as for serve
        raise Refused(USAGE, str(e)) from None
    try:
        model = models.create(spec)
        engine = Engine(model, torch.device(args.device), name=spec.alias)
    except Exception as e:  # noqa: BLE001 - a model that cannot load is the user's to fix
        raise Refused(FAILED, f"cannot load the model: {type(e).__name__}: {e}") from None
    defaults = rq.Faithful()
    steps = args.faithfulness_steps or defaults.faithfulness_steps
    removal, order = args.removal or defaults.removal, args.order or defaults.order
    if not 1 <= steps <= rq.MAX_FAITHFULNESS_STEPS:
        raise Refused(USAGE, f"--faithfulness-steps must be 1 to {rq.MAX_FAITHFULNESS_STEPS}")
    try:
        chosen = cmp.validate([(s["method"], s["params"]) for s in settings], engine.shape)
        target = models.Preprocess.from_anatomy(engine.anatomy).target()
        x = torch.from_numpy(imaging.prepare(args.image.read_bytes(), 40_000_000, target).pixels)  # (H, W, 3) uint8
    except (cmp.BadSettings, imaging.ImageError) as e:
        raise Refused(REFUSED, f"{args.image}: {e}") from None
    jobs = cmp.plan(chosen, engine.shape, steps, removal, order)
    results = engine.run(torch.stack([x] * len(jobs)), [j for j, _ in jobs])
    return cmp.answer(spec.alias, engine.shape, chosen, jobs, results, order)


def run(argv: list[str], out=None, err=None) -> int:
    import httpx

    out, err = out or sys.stdout, err or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if len(args.setting) > MAX_SETTINGS:
            raise Refused(USAGE, f"at most {MAX_SETTINGS} settings")
        settings = [setting(s) for s in args.setting]
        if not args.image.is_file():
            raise Refused(USAGE, f"no such image file: {args.image}")
        try:
            answer = _remote(args, settings) if args.server else _local(args, settings)
        except httpx.TransportError as e:
            raise Refused(UNREACHABLE, f"cannot reach the server at {args.server}: {e}") from None
    except Refused as e:
        print(f"error: {e}", file=err)
        return e.code
    if args.out is not None:
        args.out.write_text(json.dumps(answer))
    print(table(answer, [" ".join(shlex.split(s)) for s in args.setting]), file=out)
    return OK


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)
