"""`python -m service ray --model [ALIAS=]SPEC ... --replicas N --host H --port P [--address A]`:
the HTTP API on Ray Serve (service/ray_serve.py), until Ctrl-C or SIGTERM.

Its own flags (the cluster, the application's name and the deployment's shape), and every flag
of `python -m service serve` (service/flags.py); --host/--port are the Serve proxy's.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

from pydantic import ValidationError

from service import ray_serve
from service.config import Settings
from service.flags import add_settings_flags, settings_overrides

log = logging.getLogger("service.ray")


def _own_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --max-queue must reach the service's flags, not abbreviate --max-queued-requests
    p = argparse.ArgumentParser(
        prog="python -m service ray", allow_abbrev=False, add_help=False,
        description="Serve the HTTP API on Ray Serve: the flags below, and every flag of `python -m service serve` "
        "(--model, --max-batch-size, --api-key, ...; --host/--port are the Serve proxy's).")
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("--address", help="Ray cluster to join (ray://HOST:10001 or HOST:6379, or env RAY_ADDRESS); "
                   "default: start a local cluster")
    p.add_argument("--name", default=ray_serve.APP_NAME, help=f"Serve application name (default {ray_serve.APP_NAME})")
    p.add_argument("--replicas", type=int, help="replicas (default 1); with autoscaling, the initial number")
    p.add_argument("--min-replicas", type=int, help="autoscale: fewest replicas")
    p.add_argument("--max-replicas", type=int, help="autoscale: most replicas")
    p.add_argument("--target-ongoing-requests", type=float,
                   help="autoscale: requests per replica to aim for (default --max-batch-size)")
    p.add_argument("--max-ongoing-requests", type=int,
                   help="requests one replica takes at once (default 2 x --max-batch-size)")
    p.add_argument("--max-queued-requests", type=int,
                   help="requests waiting in each proxy before Serve answers 503 + Retry-After (default --max-queue)")
    p.add_argument("--replica-cpus", type=float, help="CPUs per replica (default 1; on CPU also its torch threads)")
    p.add_argument("--replica-gpus", type=float, help="GPUs per replica (default 1 where the cluster has GPUs, else 0)")
    return p


def _settings_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service ray", add_help=False)
    add_settings_flags(p)
    return p


def parse(argv: list[str]) -> tuple[dict[str, Any], dict[str, Any], argparse.Namespace]:
    """argv -> (Settings overrides, ray_serve.build()'s deployment keywords, the Ray flags)."""
    own, rest = _own_parser().parse_known_args(argv)
    if own.help:
        print(_own_parser().format_help())
        print("flags of python -m service serve, which apply too:\n")
        print(_settings_parser().format_help().split("\n\n", 1)[-1])
        raise SystemExit(0)
    overrides = settings_overrides(_settings_parser().parse_args(rest))
    shape = dict(replicas=own.replicas, min_replicas=own.min_replicas, max_replicas=own.max_replicas,
                 target_ongoing_requests=own.target_ongoing_requests, max_ongoing_requests=own.max_ongoing_requests,
                 max_queued_requests=own.max_queued_requests, num_cpus=own.replica_cpus,
                 num_gpus="auto" if own.replica_gpus is None else own.replica_gpus)
    return overrides, shape, own


def main(argv: list[str] | None = None) -> int:
    overrides, shape, own = parse(sys.argv[1:] if argv is None else argv)
    try:
        Settings(**overrides)
    except ValidationError as e:
        print(f"error: invalid settings:\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with ray_serve.on_cluster(own.address, own.name):
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            url = ray_serve.deploy(overrides, shape, own.name)
        except (ValueError, ValidationError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        log.info("serving %s at %s: %s; Ctrl-C or SIGTERM stops it", own.name, url, ray_serve.replica_states(own.name))
        stop.wait()
        log.info("stopping: replicas finish what they accepted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
