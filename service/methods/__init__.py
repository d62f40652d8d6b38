"""Every explanation method, one module each, registered in REGISTRY in import order.

Add a method: write its module (see base.py for what it declares), import it here, add its test
and its row to the README (`python -m service.methods` prints the table).
"""

from __future__ import annotations

from typing import Any

from service.engine.jobs import Job
from service.methods.base import REGISTRY, InvalidParams, Method, ModelShape, markdown_table

# isort: off  (the order of registration is the order of GET /methods and of the README table)
from service.methods import rollout  # noqa: F401, E402
from service.methods import grad_rollout  # noqa: F401, E402
from service.methods import gae  # noqa: F401, E402
from service.methods import attention  # noqa: F401, E402
from service.methods import qk  # noqa: F401, E402
from service.methods import sweep  # noqa: F401, E402
from service.methods import activation_max  # noqa: F401, E402
from service.methods import predict  # noqa: F401, E402
# isort: on


def job(name: str, **params: Any) -> Job:
    """The engine job of a registered method, e.g. job("rollout", head_fusion="mean")."""
    m = REGISTRY[name]
    return Job(m, m.Params(**params))


__all__ = ["REGISTRY", "InvalidParams", "Method", "ModelShape", "job", "markdown_table"]
