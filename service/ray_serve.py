"""The same service on Ray Serve: one Serve replica = one model pool, behind Serve's proxy.

    python -m service ray --model [ALIAS=]SPEC ... --replicas N --host H --port P [--address A]
    serve run docker/serve-config.yaml            (or serve deploy, on a running cluster)

The deployment and the application builder (`import_path: service.ray_serve:app_builder`), and
running it on a cluster (`deploy`, `on_cluster`); the command line is service/cli/ray.py. The only module
that imports ray; the plain service (`python -m service serve`) never loads it.

Each replica runs the service's own FastAPI app (service/app.py create_app), built inside the
replica from the same Settings, so every endpoint, answer, error, the request id, the API key,
the body and pixel budgets, /metrics and the dynamic batching with its bounded queue are the
single process's. What this module adds:

- the app's lifespan is entered in the replica (Serve runs an ingress app's lifespan at replica
  start) and the replica reports itself started only when its models have settled, so Serve
  never routes to a replica that is still loading (a new or recovering replica joins warm);
- an X-Replica response header naming the replica that answered;
- Serve's own request id: the proxy puts X-Request-ID on the request (the client's, else a new
  UUID) and on the answer, so the replica's copy is dropped from the answer to avoid sending it
  twice (the replica logs the same id when the client's id is sane);
- back-pressure at the edge: at most max_ongoing_requests per replica (default two batches),
  at most max_queued_requests waiting in each proxy (default --max-queue), beyond which Serve
  answers 503 with Retry-After itself; inside the replica the service's queue still answers
  503 + Retry-After when its images overflow;
- placement: num_gpus per replica where the cluster has GPUs (the replica sees only its own GPU
  as cuda:0), else num_cpus, with torch threads set to those CPUs.

Serve's proxy, not the service's uvicorn (service/server.py), accepts the connections: the
header timeout, header size limit and accept-time connection limit of service/http.py do not
apply, and the application says so when it is built; docs/proxy.md has the proxy settings
that cover them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import ray
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import RETRY_AFTER_S, Settings
from service.logs import configure_logging

log = logging.getLogger("service.ray")

APP_NAME = "vit-explain"
DEPLOYMENT = "ViTExplain"
# app_builder's arguments that shape the deployment rather than the service's Settings
DEPLOYMENT_ARGS = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests",
                   "max_queued_requests", "num_cpus", "num_gpus")


class ReplicaHeader:
    """Pure ASGI, outermost in the replica's app: X-Replica on every answer; the replica's own
    X-Request-ID dropped when the request came through Serve's proxy (it adds the id itself)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        proxied = any(k.lower() == b"x-request-id" for k, _ in scope.get("headers", ()))

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if not (proxied and k.lower() == b"x-request-id")]
                message = {**message, "headers": [*headers, (b"x-replica", self.replica)]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


def _started_when_settled(inner):  # noqa: ANN001, ANN202 - a lifespan context factory
    """The app's lifespan, whose startup ends only when every model has loaded or failed: Serve
    marks the replica running (and routes to it) when the ASGI lifespan startup is complete."""

    @contextlib.asynccontextmanager
    async def lifespan(app):  # noqa: ANN001, ANN202
        async with inner(app) as state:
            pool = app.state.ctx.pool
            while not pool.settled:  # noqa: ASYNC110 - loading runs in threads, which set no event
                await asyncio.sleep(0.05)
            yield state

    return lifespan


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()  # late-bound: the app is built in each replica by __serve_build_asgi_app__
class ViTExplain:
    """One replica: the service's app and its model pool, built from the Settings overrides."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self.settings = Settings(**overrides)  # the replica's VIT_* environment applies under the overrides
        self.replica = serve.get_replica_context().replica_tag

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from service.app import create_app

        # the service's log lines with their request ids on the replica's stderr (Ray's replica
        # log files); the root logger stays Serve's
        configure_logging(self.settings.log_level, self.settings.log_json, logger="service")
        app = create_app(self.settings)
        app.router.lifespan_context = _started_when_settled(app.router.lifespan_context)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        log.info("replica %s: %s", self.replica, ", ".join(self.settings.models))
        return app


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def build(
    overrides: dict[str, Any],
    *,
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float | None = None,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int | None = None,
    num_cpus: float | None = None,
    num_gpus: float | str | None = "auto",
):
    """The Serve application: Settings overrides (as for `python -m service serve`) for every
    replica, and the deployment's shape. Autoscaling when min_replicas or max_replicas is given
    (starting at `replicas`), else a fixed `replicas` (default 1)."""
    overrides = dict(overrides)
    if "model" in overrides:  # a config file may say model: SPEC for a single model
        overrides.setdefault("models", [])
        overrides["models"] = [overrides.pop("model"), *overrides["models"]]
    settings = Settings(**overrides)  # refuse bad settings here, before any replica starts
    if settings.workers != 1:
        raise ValueError("workers does not apply on Ray Serve, where each replica is one server process: "
                         "set replicas instead (and num_gpus below 1 to share a GPU between them)")
    log.warning("on Ray Serve, Serve's proxy accepts the connections: the service's header timeout, header size "
                "limit and connection limit (service/http.py) do not apply; set them in a proxy in front "
                "(docs/proxy.md)")
    if num_gpus in (None, "auto"):
        num_gpus = 1.0 if _cluster_gpus() >= 1 else 0.0
    num_gpus = float(num_gpus)
    if num_gpus == 0:
        # CPU replicas: one engine with the replica's CPUs as torch threads, unless told otherwise
        num_cpus = 1.0 if num_cpus is None else float(num_cpus)
        if overrides.get("device", settings.device) == "auto":
            overrides["device"] = "cpu"
        overrides.setdefault("replicas_per_device", 1)
        overrides.setdefault("threads", max(1, math.floor(num_cpus)))
    else:
        num_cpus = 1.0 if num_cpus is None else float(num_cpus)  # the replica's event loop, decoding, drawing
    batch = settings.max_batch_size
    options: dict[str, Any] = dict(
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        # one batch computing and the next filling; more would only queue inside the replica
        max_ongoing_requests=max_ongoing_requests or 2 * batch,
        # bounded waiting at the proxy; past it Serve answers 503 + Retry-After
        max_queued_requests=max_queued_requests or settings.max_queue,
        backpressure_config={"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        # a stopping replica finishes what it accepted (activation maximization included)
        graceful_shutdown_timeout_s=settings.request_timeout_s + 5,
    )
    if min_replicas is not None or max_replicas is not None:
        lo = 1 if min_replicas is None else min_replicas
        hi = max(lo, replicas or lo) if max_replicas is None else max_replicas
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"need 0 <= min_replicas ({lo}) <= max_replicas ({hi}) and max_replicas >= 1")
        options["autoscaling_config"] = {
            "min_replicas": lo, "max_replicas": hi, "initial_replicas": min(max(replicas or lo, lo), hi),
            # about one full batch waiting or running per replica
            "target_ongoing_requests": target_ongoing_requests or batch,
        }
    else:
        options["num_replicas"] = replicas or 1
    return ViTExplain.options(**options).bind(overrides)


def app_builder(args: dict[str, Any]):
    """For a Serve config file: `import_path: service.ray_serve:app_builder` with `args:` the
    Settings fields (`models: [...]`, `max_batch_size: 16`, ...) and the deployment's shape
    (`replicas`, `min_replicas`, `max_replicas`, `target_ongoing_requests`, `max_ongoing_requests`,
    `max_queued_requests`, `num_cpus`, `num_gpus`)."""
    args = dict(args or {})
    shape = {k: args.pop(k) for k in DEPLOYMENT_ARGS if k in args}
    return build(args, **shape)


def deploy(overrides: dict[str, Any], shape: dict[str, Any], name: str = APP_NAME, route_prefix: str = "/") -> str:
    """On the connected cluster: start Serve's proxy at --host/--port (when Serve is not running
    yet), run the application at /, and wait until its replicas are ready. Returns the URL."""
    settings = Settings(**overrides)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build(overrides, **shape), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{settings.host}:{settings.port}{route_prefix.rstrip('/')}"


@contextlib.contextmanager
def on_cluster(address: str | None, name: str = APP_NAME) -> Iterator[None]:
    """Ray connected for the block: to the cluster at `address`, else to a local one started here.
    At the end, on a cluster joined, only the application `name` goes (the cluster and its Serve
    stay); a local cluster is shut down."""
    ray.init(address=address)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            if address:
                serve.delete(name)
            else:
                serve.shutdown()
        ray.shutdown()


def replica_states(name: str = APP_NAME) -> dict[str, int]:
    """The application's replicas by state (RUNNING, STARTING, ...)."""
    return dict(serve.status().applications[name].deployments[DEPLOYMENT].replica_states)
