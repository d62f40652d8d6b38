"""The explorer page: a static web page at `/` that drives the public API from the browser, and
the one endpoint it needs that the API did not have, the label list of a model.

The page's files (service/static/explorer/) hold no data and load without the API key (see
OPEN_PATHS in middleware.py); every API call the page makes sends the key the user entered.
Only files of that folder are served, by name: nothing in a path reaches the file system.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse
from pydantic import BaseModel

from schemas import responses as rs
from service.api.deps import ContextDep

STATIC = Path(__file__).resolve().parent.parent / "static" / "explorer"
PREFIX = "/explorer/"  # the page's own files; open without the API key
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page asks for the API key: it must never be framed (clickjacking), and it runs only its own
# scripts. Styles: its stylesheet, plus the style attributes its script sets (score bars); images:
# its own, and the answers shown as blob: and data: URLs; requests: this origin only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
       "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'")
# The page changes with the service: browsers revalidate rather than run a stale script.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Content-Security-Policy": CSP, "Referrer-Policy": "no-referrer"}

router = APIRouter()


def _files() -> dict[str, Path]:
    return {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in MEDIA} if STATIC.is_dir() else {}


FILES = _files()


def _file(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise HTTPException(404, f"no file {name!r} in the explorer page")
    return FileResponse(path, media_type=MEDIA[path.suffix], headers=HEADERS)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return _file("index.html")


@router.get(PREFIX + "{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    return _file(name)


class Labels(BaseModel):
    model: str
    labels: list[str]  # label of class i at index i


@router.get("/models/{name}/labels", response_model=Labels, tags=["service"],
            summary="The class labels of a model, by class id (for a class picker)",
            responses={code: {"model": rs.Error} for code in (401, 404, 503)})
async def labels(name: str, ctx: ContextDep) -> Labels:
    served = ctx.pool.get(name)
    return Labels(model=served.name, labels=list(served.labels))
