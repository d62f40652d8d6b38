"""The floor of part D: the least a FastAPI service can do for one 224 px explanation.

    python -m bench.floor_app --port P

`POST /rollout` (any query string or form fields are ignored) reads the upload from a multipart
body (field `image`), a JSON body (`{"image": base64}`) or a raw image body, decodes it with
Pillow, resizes it to 224 x 224, converts it to float32 and answers a 14 x 14 JSON map: what
issue 17's "for scale" app does (0.98 ms of CPU per request multipart, 0.75 ms raw, on the quiet
2-core box). No model, no validation, no limits. Served by uvicorn with its defaults (uvloop and
httptools, as the service), so that bench/path.py can time it beside the service under the same
load from other processes, and say how far the service is above it in the same run.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from PIL import Image

app = FastAPI()


@app.get("/readyz")
def readyz() -> dict:
    return {"status": "ready"}


@app.post("/rollout")
async def rollout(request: Request) -> dict:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form()
        data = await form["image"].read()
    elif ctype.startswith("application/json"):
        data = base64.b64decode((await request.json())["image"])
    else:
        data = await request.body()
    with Image.open(io.BytesIO(data)) as im:
        x = np.asarray(im.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255.0
    cell = x.mean(axis=2).reshape(14, 16, 14, 16).mean(axis=(1, 3))
    return {"grid": [14, 14], "mask": cell.round(4).tolist()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor_app")
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
