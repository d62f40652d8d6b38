"""Every explanation method, one module each, registered in REGISTRY in import order.

Add a method (docs/methods.md): write its module over one of the two kinds in base.py
(`OnePassMethod` or `LongMethod`), import it here, add its typed call to service/client/methods.py (a test
checks every method has one), its test, and its row to the README (`python -m service.methods`
prints the table).
"""

from __future__ import annotations

from typing import Any

from service.engine.contract import Job, ModelShape
from service.methods.base import InvalidParams, LongMethod, MaskMethod, Method, OnePassMethod
from service.methods.registry import REGISTRY
from service.methods.table import markdown_table

# isort: off  (the order of registration is the order of GET /methods and of the README table)
from service.methods import rollout  # noqa: F401
from service.methods import grad_rollout  # noqa: F401
from service.methods import gae  # noqa: F401
from service.methods import attention  # noqa: F401
from service.methods import qk  # noqa: F401
from service.methods import sweep  # noqa: F401
from service.methods import activation_max  # noqa: F401
from service.methods import predict  # noqa: F401
# isort: on


def job(name: str, **params: Any) -> Job:
    """The engine job of a registered method, e.g. job("rollout", head_fusion="mean")."""
    m = REGISTRY[name]
    return Job(m, m.Params(**params))


def warmup_jobs() -> list[Job]:
    """One job of each pass the engine runs (plain and autograd), for warming a replica up."""
    return [job("rollout"), job("grad-rollout", category_id=0)]


__all__ = ["REGISTRY", "InvalidParams", "LongMethod", "MaskMethod", "Method", "ModelShape", "OnePassMethod", "job",
           "markdown_table", "warmup_jobs"]
