"""Routers: which worker gets an arriving request.

A router is a class registered under a ``kind``; the scenario's
``router: {kind: ..., <params>}`` selects it. ``choose`` sees the request and the
workers' engines. Routers that read engine state set ``state_dependent`` so the
cluster brings every worker up to the current time before asking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .registry import Registry
from .request import Request


class Router(Protocol):
    state_dependent: bool

    def choose(self, req: Request, engines: Sequence[Any]) -> int: ...


ROUTERS: Registry[type] = Registry("router")


@ROUTERS.register("round_robin")
class RoundRobin:
    """Worker i, i+1, ... in turn, whatever their load."""

    state_dependent = False

    def __init__(self, num_workers: int, rng: np.random.Generator) -> None:
        self.num_workers = num_workers
        self._next = 0

    def choose(self, req: Request, engines: Sequence[Any]) -> int:
        w = self._next
        self._next = (w + 1) % self.num_workers
        return w


def make_router(kind: str, params: dict[str, Any], num_workers: int,
                rng: np.random.Generator) -> Router:
    cls = ROUTERS.get(kind, "cluster.router.kind")
    router: Router = cls(num_workers, rng, **params)
    return router
