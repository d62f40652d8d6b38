"""The service on Ray Serve, on a real local cluster (127.0.0.1, 2 CPUs, no dashboard): two CPU
replicas answer the single process's maps, share the load, survive one being killed, and go
away cleanly; plus the checked-in Serve config and KubeRay manifest, linted without a cluster.

The cluster tests need ray (pip install .[ray]; `make test` installs it). Without it they are
skipped with that reason; a cluster that cannot start fails them, with Ray's own error.
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from tests import reference as ref
from tests.conftest import png_bytes, smooth_image
from tests.server import free_port

ray = pytest.importorskip("ray", reason="ray is not installed: pip install '.[ray]' (make test installs it)")
from ray import serve  # noqa: E402

from service import ray_serve  # noqa: E402
from service.cli import ray as ray_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCH = "deit_tiny_patch16_224"
KEY = "ray-test-key"
HEADERS = {"X-API-Key": KEY}


def _post(client: httpx.Client, path: str, img: Image.Image, **fields) -> httpx.Response:
    return client.post(path, files={"image": ("x.png", png_bytes(img), "image/png")},
                       data={k: str(v) for k, v in fields.items()}, headers=HEADERS)


# -- without a cluster -----------------------------------------------------------------------------
@pytest.mark.slow
def test_plain_service_does_not_import_ray():
    code = ("import sys, service.app, service.__main__, service.cli.serve, service.server; "
            "sys.exit(1 if 'ray' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0


def test_command_flags_reach_settings_and_deployment():
    overrides, shape, own = ray_cli.parse(
        ["--model", "a=local-dir:/x", "--replicas", "2", "--max-queue", "64", "--min-replicas", "1",
         "--max-replicas", "4",
         "--port", "9100", "--replica-cpus", "0.5", "--address", "10.0.0.1:6379", "--max-queued-requests", "20"])
    assert overrides == {"models": ["a=local-dir:/x"], "max_queue": "64", "port": "9100"}
    assert own.address == "10.0.0.1:6379"
    assert shape["replicas"] == 2 and shape["min_replicas"] == 1 and shape["max_replicas"] == 4
    assert shape["num_cpus"] == 0.5 and shape["num_gpus"] == "auto" and shape["max_queued_requests"] == 20
    config = ray_serve.build(overrides, **shape)._bound_deployment._deployment_config
    assert config.autoscaling_config.min_replicas == 1 and config.autoscaling_config.max_replicas == 4
    assert config.autoscaling_config.initial_replicas == 2
    assert config.max_queued_requests == 20 and config.max_ongoing_requests == 32  # 2 x max_batch_size
    assert config.backpressure_config.status_code == 503 and config.backpressure_config.retry_after_s == 2
    with pytest.raises(SystemExit):
        ray_cli.parse(["--no-such-flag"])


def test_every_setting_is_a_flag_of_the_ray_command(capsys):
    """The same settings flags as `python -m service serve` (service/flags.py), and in its help."""
    from service.config import Settings

    for name, field in Settings.model_fields.items():
        flag = "--model" if name == "models" else "--" + name.replace("_", "-")
        argv = [f"--no-{flag[2:]}"] if field.annotation is bool else [flag, "7"]
        overrides, _, _ = ray_cli.parse(argv)
        assert overrides == {name: False if field.annotation is bool else ["7"] if name == "models" else "7"}, name
    with pytest.raises(SystemExit) as e:
        ray_cli.parse(["--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    assert "--replica-gpus" in shown and "--max-batch-size" in shown and "--api-key" in shown


def test_building_the_application_names_what_is_unguarded_on_ray(caplog):
    with caplog.at_level("WARNING", logger="service.ray"):
        ray_serve.build({"models": ["a=local-dir:/x"]})
    assert any("header timeout" in r.getMessage() and "docs/proxy.md" in r.getMessage() for r in caplog.records)


def _check_serve_config(config: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # Serve's own schema for `serve deploy` files
    for app in config["applications"]:
        module, attr = app["import_path"].split(":")
        assert module == "service.ray_serve" and callable(getattr(ray_serve, attr))
        built = ray_serve.app_builder(app.get("args", {}))._bound_deployment
        assert built.name == ray_serve.DEPLOYMENT


def test_serve_config_file():
    _check_serve_config(yaml.safe_load((ROOT / "docker" / "serve-config.yaml").read_text()))


def test_kuberay_rayservice_manifest():
    doc = yaml.safe_load((ROOT / "docker" / "kuberay-rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert isinstance(spec["serveConfigV2"], str)  # KubeRay takes the Serve config as a YAML string
    _check_serve_config(yaml.safe_load(spec["serveConfigV2"]))
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    assert len(groups) >= 2
    for name, group in groups:
        assert isinstance(group["rayStartParams"], dict), name
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["image"] for c in containers), name
        for c in containers:
            res = c["resources"]
            assert res["requests"]["cpu"] and res["limits"]["memory"], name
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    gpus = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
            for g in cluster["workerGroupSpecs"]}
    assert args["num_gpus"] <= max(gpus.values()), "a replica asks for more GPUs than any worker has"
    assert args["max_replicas"] * args["num_gpus"] <= sum(g["maxReplicas"] * gpus[g["groupName"]]
                                                          for g in cluster["workerGroupSpecs"])
    cpus = {g["groupName"]: float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
            for g in cluster["workerGroupSpecs"]}
    per_gpu = 1 / args["num_gpus"]  # replicas sharing one GPU must find their CPUs on its worker too
    assert any(per_gpu * args["num_cpus"] <= cpus[name] and gpus[name] >= 1 for name in gpus)
    built = ray_serve.app_builder(yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"])._bound_deployment
    assert built.ray_actor_options == {"num_cpus": args["num_cpus"], "num_gpus": args["num_gpus"]}


def test_workers_is_refused_on_ray():
    with pytest.raises(ValueError, match="workers does not apply on Ray Serve"):
        ray_serve.build({"models": ["a=local-dir:/x"], "workers": 2})


def test_fractional_gpus_per_replica():
    argv = ["--model", "a=local-dir:/x", "--replica-gpus", "0.25", "--replica-cpus", "1"]
    overrides, shape, _ = ray_cli.parse(argv)
    built = ray_serve.build(overrides, **shape)._bound_deployment
    assert built.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert "device" not in built.init_args[0]  # the replica uses the GPU it shares (auto), not the CPU


# -- on a local cluster ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(model_dirs):
    """A local Ray cluster with the application at / (two replicas of half a CPU, one torch thread)."""
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 * 1024,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - say why, loudly
        pytest.fail(f"a local Ray cluster could not start on this machine: {type(e).__name__}: {e}")
    port = free_port()
    argv = ["--model", f"deit=local-dir:{model_dirs[ARCH]}", "--replicas", "2", "--replica-cpus", "0.5",
            "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY, "--max-delay-ms", "10"]
    overrides, shape, _ = ray_cli.parse(argv)
    try:
        url = ray_serve.deploy(overrides, shape)
        yield url
    finally:
        _shutdown()


def _shutdown() -> None:
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(model_dirs):
    """The same app in this process (one thread, one engine): the single-process answers."""
    from starlette.testclient import TestClient

    from service.app import create_app
    from service.config import Settings

    app = create_app(Settings(models=[f"deit=local-dir:{model_dirs[ARCH]}"], device="cpu", replicas_per_device=1,
                              threads=1, api_key=KEY, max_delay_ms=10))
    with TestClient(app) as c:
        deadline = time.monotonic() + 60
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the in-process app did not become ready"
            time.sleep(0.1)
        yield c


@pytest.fixture()
def client(cluster):
    with httpx.Client(base_url=cluster, timeout=60) as c:
        yield c


def _replica_states() -> dict:
    app = serve.status().applications[ray_serve.APP_NAME]
    return dict(app.deployments[ray_serve.DEPLOYMENT].replica_states)


def test_two_replicas_ready_with_replica_request_id_and_key(client):
    assert _replica_states() == {"RUNNING": 2}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["models"] == {"deit": "ready"}
    assert r.headers["x-replica"]
    r = client.get("/models", headers={**HEADERS, "X-Request-ID": "my-id-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-id-1"  # once, not twice
    assert r.json()[0]["name"] == "deit" and r.json()[0]["replicas"] == 1
    r = client.get("/models")
    assert r.status_code == 401 and r.headers["x-replica"]  # the API key is checked in the replica
    r = client.get("/metrics", headers=HEADERS)
    assert r.status_code == 200 and "vit_requests_total" in r.text


def _close(got, want, path="") -> None:
    """JSON answers equal, floats to 1e-4, base64 PNGs to one grey level."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-4), path
    elif isinstance(want, str) and want.startswith("iVBOR"):
        g, w = (np.asarray(Image.open(io.BytesIO(base64.b64decode(s))), np.int16) for s in (got, want))
        assert g.shape == w.shape and np.abs(g - w).max() <= 1, path
    else:
        assert got == want, path


CASES = [
    ("/gae", dict(category_id=5, format="json")),
    ("/attention", dict(head="mean", format="json")),
    ("/qk", dict(layer=3, head=1, channel=7, which="k", format="json")),
    ("/predict", {}),  # json only
    ("/rollout/sweep", dict(discard_ratios="0,0.5,0.9", format="json")),
    ("/grad-rollout/sweep", dict(category_id=7, discard_ratios="0,0.9", format="json")),
    ("/activation-max", dict(steps=3, seed=1, format="json")),
]


def test_every_endpoint_answers_the_single_process_maps(client, single, models):
    from service.methods import REGISTRY

    routes = {m.route for m in REGISTRY.values()}
    assert routes == {p for p, _ in CASES} | {"/rollout", "/grad-rollout"}, "a method is missing from this test"
    img = smooth_image(300)
    r = ref.Reference(models[ARCH])
    x = ref.preprocess(img, r.model)
    body = _post(client, "/rollout", img, format="json").json()
    np.testing.assert_allclose(body["mask"], r.rollout(r.run(x), "max", 0.9), atol=3e-3)
    body = _post(client, "/grad-rollout", img, format="json", category_id=42).json()
    np.testing.assert_allclose(body["mask"], r.grad_rollout(r.run(x, category=42), "mean", 0.9), atol=5e-3)
    for path, fields in CASES:
        got, want = _post(client, path, img, **fields), _post(single, path, img, **fields)
        assert got.status_code == want.status_code == 200, (path, got.text)
        _close(got.json(), want.json(), path)
    got, want = _post(client, "/rollout", img, format="png"), _post(single, "/rollout", img, format="png")
    assert got.headers["content-type"] == want.headers["content-type"] == "image/png"
    assert got.headers["x-predicted-class"] == want.headers["x-predicted-class"]
    g, w = (np.asarray(Image.open(io.BytesIO(a.content)), np.int16) for a in (got, want))
    assert np.abs(g - w).max() <= 1


def test_concurrent_requests_are_spread_over_both_replicas(client):
    img = smooth_image(301)

    def one(_):
        with httpx.Client(base_url=str(client.base_url), timeout=60) as c:
            r = _post(c, "/rollout", img, format="json")
            assert r.status_code == 200, r.text
            return r.headers["x-replica"]

    with ThreadPoolExecutor(16) as pool:
        seen = list(pool.map(one, range(32)))
    assert len(set(seen)) == 2, seen


def _replica_actor(tag: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    name = next((n for n in names if n.startswith("SERVE_REPLICA::") and n.endswith("#" + tag)), None)
    assert name is not None, (tag, names)
    return ray.get_actor(name, namespace="serve")


def test_killing_a_replica_under_load_loses_no_retried_request(client, models):
    img = smooth_image(302)
    r = ref.Reference(models[ARCH])
    want = r.rollout(r.run(ref.preprocess(img, r.model)), "max", 0.9)
    clients, per_client = 6, 10
    answers, failures, retries = [], [], [0]
    lock, first_answers = threading.Lock(), threading.Event()

    def worker():
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            for _ in range(per_client):
                deadline = time.monotonic() + 60
                while True:
                    try:
                        resp = _post(c, "/rollout", img, format="json")
                    except httpx.TransportError:
                        resp = None
                    if resp is not None and resp.status_code == 200:
                        with lock:
                            answers.append((resp.headers["x-replica"], resp.json()["mask"]))
                            if len(answers) >= 8:
                                first_answers.set()
                        break
                    if resp is not None and resp.status_code < 500 or time.monotonic() > deadline:
                        with lock:
                            failures.append(resp.status_code if resp is not None else "transport")
                        break
                    with lock:
                        retries[0] += 1
                    time.sleep(min(float(resp.headers.get("retry-after", 0.2)) if resp is not None else 0.2, 1.0))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    assert first_answers.wait(60), "no answers under load"
    with lock:
        victim = answers[-1][0]
    ray.kill(_replica_actor(victim), no_restart=True)
    killed_at = len(answers)
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert len(answers) == clients * per_client  # every request answered, after retries where needed
    for _, mask in answers:
        np.testing.assert_allclose(mask, want, atol=3e-3)
    assert killed_at < len(answers)
    # the application recovers to two running replicas, the killed one replaced
    deadline = time.monotonic() + 90
    while _replica_states() != {"RUNNING": 2}:
        assert time.monotonic() < deadline, f"no recovery to two replicas: {_replica_states()}"
        time.sleep(0.5)
    # and the proxy routes to the new one (it learns of it shortly after it runs)
    def one(_):
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            return _post(c, "/rollout", img, format="json").headers["x-replica"]

    seen: set[str] = set()
    deadline = time.monotonic() + 90  # a saturated machine's proxy had not learned of it in 30 s
    with ThreadPoolExecutor(8) as pool:
        while len(seen) < 2 and time.monotonic() < deadline:
            seen |= set(pool.map(one, range(16)))
    assert victim not in seen and len(seen) == 2, (victim, seen)
    print(f"killed replica {victim}: {retries[0]} retries, {len(answers)} answers")


def test_serve_answers_503_with_retry_after_past_its_queue(cluster, model_dirs):
    """A second application with room for one request running and one waiting. While a long request
    runs, a burst gets the one waiting place (answered once the long one ends) and Serve's own 503 +
    Retry-After for the rest (plain text, not the service's JSON). A burst with nothing running yet
    may find the waiting place taken by its own first request, on its way to the replica (seen: one
    200 of 12 in a CI run); the long request, sent a second before the burst, has left it."""
    argv = ["--model", f"deit=local-dir:{model_dirs[ARCH]}", "--replicas", "1", "--replica-cpus", "0.5",
            "--max-ongoing-requests", "1", "--max-queued-requests", "1", "--api-key", KEY,
            "--request-timeout-s", "300", "--host", "127.0.0.1", "--port", cluster.rsplit(":", 1)[1]]
    overrides, shape, _ = ray_cli.parse(argv)
    url = ray_serve.deploy(overrides, shape, name="edge", route_prefix="/edge")
    img = smooth_image(303)
    # scored with 2 x 65 forward passes: about 3 s on the replica alone, the burst comes at 1 s; on a
    # saturated machine it took over 60 s, hence the request timeout of 300 s
    long = dict(format="json", category_id=1, faithfulness="true", faithfulness_steps=64)
    try:
        def one(path, **fields):
            with httpx.Client(base_url=url, timeout=300) as c:
                return _post(c, path, img, **fields)

        with ThreadPoolExecutor(12) as pool:
            t0 = time.monotonic()
            running = pool.submit(one, "/grad-rollout", **long)
            time.sleep(1.0)
            burst = list(pool.map(lambda _: one("/grad-rollout", format="json", category_id=1), range(11)))
            assert running.result().status_code == 200, running.result().text
            print(f"the long request and the burst's waiting one took {time.monotonic() - t0:.1f} s")
        codes = sorted(a.status_code for a in burst)
        assert codes == [200] + [503] * 10, codes
        for a in burst:
            if a.status_code == 503:
                assert a.headers["retry-after"] == "2" and "backpressure" in a.text
    finally:
        serve.delete("edge")


def test_shutdown_is_clean(cluster):
    import psutil

    me = psutil.Process()
    assert any("raylet" in p.name() or "gcs_server" in p.name() for p in me.children(recursive=True))
    _shutdown()
    deadline = time.monotonic() + 30
    while True:
        left = [p for p in me.children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            break
        assert time.monotonic() < deadline, [(p.pid, p.name()) for p in left]
        time.sleep(0.5)
