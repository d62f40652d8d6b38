"""`python -m service explain IMAGE... --method rollout [--param value ...] -o OUT`

Runs one method over images (files, folders, globs) and writes its PNG/GIF or its JSON (the API's
answer), either through a running service (`--server URL`, by the Python client) or in this
process (`--model SPEC`, through the same engine, no server). The method's parameters are its
own declarations (`python -m service explain --method gae --help` lists them).

Output: with one image, OUT is the file to write (its extension picks the format unless
`--format` is given; no OUT writes JSON to stdout), or an existing folder to write
OUT/<name>.<format> into; with several, OUT is a folder (created) and each image writes
OUT/<name>.<format>. OUT is checked before any request. An answer is written only when it is
complete and is what was asked for (status, content type, a whole PNG/GIF or JSON that parses),
through a temporary file renamed when done; `--deadline` bounds each image's whole answer and
`--max-answer-mb` its size.

Exit codes: 0 done; 2 bad arguments or parameters, no images, or an OUT that cannot be written;
3 the server cannot be reached; 4 the service (or the engine) refused an input, with its
detail; 5 the service failed, or answered something other than what was asked for (a redirect,
an HTML page, a cut or oversized body, a broken event stream, no whole answer by the deadline).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import ValidationError

from service.cli import DEADLINE_S, FAILED, OK, REFUSED, UNREACHABLE, USAGE, Refused, positive, write_atomically
from service.methods import REGISTRY, Method

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
SUFFIX_FORMATS = {".png": "png", ".json": "json", ".gif": "gif", ".apng": "apng", ".jpg": "jpeg", ".jpeg": "jpeg",
                  ".webp": "webp"}
EXTENSIONS = {"png": ".png", "json": ".json", "gif": ".gif", "apng": ".png", "jpeg": ".jpg", "webp": ".webp"}
DEFAULT_METHOD = next(iter(REGISTRY))  # the first registered


def _base_parser(add_help: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service explain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, add_help=add_help)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders or globs")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(REGISTRY),
                   help=f"the method (default: {DEFAULT_METHOD})")
    p.add_argument("-o", "--out", help="output file, or an existing folder (one image); folder (several)")
    p.add_argument("--format", help="output format (default: from OUT's extension, else the method's first)")
    p.add_argument("--server", help="URL of a running service, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="X-API-Key for --server")
    p.add_argument("--model", help="with --server: a served model alias; without: a model [ALIAS=]SPEC to load "
                                   "in this process (default: the bundled shapes-vit demo model)")
    p.add_argument("--device", default="cpu", help="device for the in-process engine (default cpu)")
    p.add_argument("--jobs", type=int, default=4, help="requests in flight with --server (default 4)")
    p.add_argument("--deadline", type=positive, default=DEADLINE_S, metavar="S",
                   help="with --server: the longest one image may take, from its first connection to the last "
                        "byte of its answer, retries and their waits included (default 600; the server's own "
                        "--request-timeout-s ends its work sooner, 60 by default); past it the image fails")
    p.add_argument("--max-answer-mb", type=positive, default=512.0, metavar="MB",
                   help="with --server: largest answer taken (default 512)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _method_parser(method: Method) -> argparse.ArgumentParser:
    p = _base_parser(add_help=True)
    g = p.add_argument_group(f"{method.name} parameters (service defaults when left out)")
    for name, f in method.Params.model_fields.items():
        if name in ("model", "format"):
            continue
        default = "required" if f.is_required() else f"default {f.default!r}"
        flag = {"nargs": "?", "const": "true"} if f.annotation is bool else {}  # --faithfulness alone means true
        g.add_argument("--" + name.replace("_", "-"), dest=f"param_{name}", metavar="VALUE",
                       help=f"{f.description or ''} ({default})", **flag)
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, Method, dict]:
    known, _ = _base_parser(add_help=False).parse_known_args(argv)
    method = REGISTRY[known.method]
    args = _method_parser(method).parse_args(argv)
    params = {k.removeprefix("param_"): v for k, v in vars(args).items() if k.startswith("param_") and v is not None}
    return args, method, params


def expand(patterns: list[str]) -> list[Path]:
    """Files, folders (their images, sorted) and globs -> image paths, in order, without repeats."""
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(pattern, recursive=True) if Path(q).is_file())
        else:
            found = [p]
        for q in found:
            if q not in out:
                out.append(q)
    return out


def _output_format(args: argparse.Namespace, method: Method, many: bool) -> str:
    if args.format:
        fmt = args.format
    elif args.out is not None and not many and not Path(args.out).is_dir() \
            and Path(args.out).suffix.lower() in SUFFIX_FORMATS:
        fmt = SUFFIX_FORMATS[Path(args.out).suffix.lower()]
    elif args.out is None:
        fmt = "json"
    else:
        fmt = method.formats[0]
    if fmt not in method.formats:
        raise Refused(USAGE, f"{method.name} answers {', '.join(method.formats)}, not {fmt}")
    if args.out is None and fmt != "json":
        raise Refused(USAGE, f"a {fmt} answer needs -o FILE (only JSON is written to stdout)")
    return fmt


def _targets(out: str | None, images: list[Path | None], fmt: str, name: str) -> list[Path | None]:
    """Where each image's answer goes (None: stdout), checked before any request: an existing
    folder takes the answers inside it; a file's folder must exist; several images need a folder."""
    def inside(folder: Path, image: Path | None) -> Path:
        return folder / f"{image.stem if image else name}{EXTENSIONS[fmt]}"

    if out is None:
        return [None] * len(images)
    path = Path(out)
    if len(images) > 1:
        if path.exists() and not path.is_dir():
            raise Refused(USAGE, f"-o {out}: not a folder (several images write one file each into a folder)")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Refused(USAGE, f"-o {out}: cannot create the folder: {e.strerror or e}") from None
        return [inside(path, image) for image in images]
    if path.is_dir():
        return [inside(path, images[0])]
    if out.endswith(("/", os.sep)):
        raise Refused(USAGE, f"-o {out}: no such folder")
    if not path.parent.is_dir():
        raise Refused(USAGE, f"-o {out}: no such folder {str(path.parent)!r}")
    return [path]


# -- the two ways to run a method ------------------------------------------------------------------
class Remote:
    """Through a running service, by the Python client: one request per image."""

    def __init__(self, url: str, api_key: str | None, model: str | None, deadline: float, max_answer_mb: float) -> None:
        from service.client import Client

        self.client = Client(url, api_key=api_key, retries=5, deadline=deadline,
                             max_answer_bytes=int(max_answer_mb * 1024 * 1024))
        self.model = model

    def run(self, method: Method, params: dict, image: Path | None, fmt: str, progress,
            target: Path | None) -> bytes | None:
        """-> the answer's bytes, or None when it has been written to `target` (streamed there)."""
        from service.client import ServiceError, picture_of

        try:
            if method.kind == "long":  # streamed, for the progress bar; its JSON answer carries its picture
                answer = self.client.request(method.route, image, model=self.model, on_progress=progress, **params)
                return answer if fmt == "json" else picture_of(json.loads(answer))
            got = self.client.request(method.route, image, format=fmt, model=self.model, to=target, **params)
            return None if target is not None else got
        except ServiceError as e:
            code = REFUSED if e.status < 500 else FAILED
            raise Refused(code, f"{image or method.name}: {e.status}: {e.detail}") from None


class Local:
    """In this process, through the service's own engine: no server."""

    def __init__(self, spec: str | None, device: str) -> None:
        import torch

        from service import models
        from service.config import DEFAULT_MODELS
        from service.engine.engine import Engine

        spec = models.ModelSpec.parse(spec or DEFAULT_MODELS[-1])
        model = models.create(spec)
        self.engine = Engine(model, torch.device(device), name=spec.alias)
        self.preprocess = models.Preprocess.from_anatomy(self.engine.anatomy)

    def run(self, method: Method, params: dict, image: Path | None, fmt: str, progress,
            target: Path | None) -> bytes:
        import torch

        from service import imaging
        from service.methods import InvalidParams

        shape = self.engine.shape
        try:
            given = {**params, "format": fmt} if "format" in method.Params.model_fields else params
            p = method.Params(**given)
            method.check(p, shape)
            need = self.preprocess.target(method.canvas(p))
            decoded = imaging.prepare(image.read_bytes(), 40_000_000, need) if image else None
        except (InvalidParams, imaging.ImageError) as e:
            raise Refused(REFUSED, f"{image or method.name}: {e}") from None
        img = decoded.canvas if decoded is not None else None
        job = method.job(p)
        if method.kind == "long":
            state = method.start(p, decoded.pixels if decoded is not None else None, shape)
            for step in range(method.steps(p)):
                (value,) = self.engine.step([state], [job])
                progress(step, value)
            result = method.result(p, state)
        else:
            (result,) = self.engine.run(torch.from_numpy(decoded.pixels)[None], [job])
        if fmt == "json":
            return json.dumps(method.to_json(p, result, shape)).encode()
        return method.render(p, img, result, shape)[0]


def _validate(method: Method, params: dict) -> None:
    """Parameters checked before any work, as the service would (model-dependent ranges aside)."""
    try:
        method.Params(**params)
    except ValidationError as e:
        msgs = "; ".join(f"--{'.'.join(str(x) for x in err['loc']).replace('_', '-')}: {err['msg']}"
                         for err in e.errors())
        raise Refused(USAGE, f"invalid parameters for {method.name}: {msgs}") from None


def run(argv: list[str], out=None, err=None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        args, method, params = parse(argv)
    except SystemExit as e:  # argparse: --help (0) or bad arguments (2)
        return int(e.code or 0)
    try:
        return _run(args, method, params, out, err)
    except Refused as e:
        print(f"error: {e}", file=err)
        return e.code


def _run(args, method: Method, params: dict, out, err) -> int:
    import httpx
    from tqdm import tqdm

    _validate(method, params)
    images: list[Path | None] = list(expand(args.images))
    if not images:
        if method.image == "required":
            raise Refused(USAGE, "no images given (files, folders or globs)")
        images = [None]
    missing = [str(p) for p in images if p is not None and not p.is_file()]
    if missing:
        raise Refused(USAGE, f"no such image file: {', '.join(missing)}")
    many = len(images) > 1
    if many and args.out is None:
        raise Refused(USAGE, "several images need -o FOLDER")
    fmt = _output_format(args, method, many)
    targets = _targets(args.out, images, fmt, method.name)
    if not args.server and args.model:
        from service import models

        try:
            models.ModelSpec.parse(args.model)
        except ValueError as e:  # an unknown source: a usage error, as for serve
            raise Refused(USAGE, str(e)) from None
    try:
        runner = (Remote(args.server, args.api_key, args.model, args.deadline, args.max_answer_mb) if args.server
                  else Local(args.model, args.device))
    except Exception as e:  # noqa: BLE001 - a model that cannot load is the user's to fix
        raise Refused(FAILED, f"cannot load the model: {type(e).__name__}: {e}") from None
    bar = tqdm(total=len(images), unit="image", disable=args.quiet or not many, file=err)
    steps_bar = tqdm(total=method.steps(method.Params(**params)), unit="step", disable=args.quiet or many,
                     file=err) if method.kind == "long" else None

    def progress(step: int, value: float) -> None:
        if steps_bar is not None:
            steps_bar.set_postfix(objective=f"{value:.3f}")
            steps_bar.update(1)

    def one(job: tuple[Path | None, Path | None]) -> tuple[Path | None, bytes | None]:
        image, target = job
        return target, runner.run(method, params, image, fmt, progress, target)

    try:
        jobs = args.jobs if isinstance(runner, Remote) else 1
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            for target, body in pool.map(one, zip(images, targets)):
                if target is None:
                    out.write(body.decode() + "\n")
                elif body is not None:
                    write_atomically(target, body)
                bar.update(1)
    except httpx.TransportError as e:
        raise Refused(UNREACHABLE, f"cannot reach the server at {args.server}: {e}") from None
    except OSError as e:  # the output could not be written (a full disk, no permission)
        raise Refused(USAGE, f"cannot write the output: {e}") from None
    finally:
        bar.close()
        if steps_bar is not None:
            steps_bar.close()
    return OK


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv)
