"""One plugin mechanism: a registry keyed by a ``kind`` string.

A duplicate key raises; an unknown key lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import ScenarioError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, kind: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if kind in self._items:
                raise ValueError(f"{self.what} kind {kind!r} is already registered")
            self._items[kind] = item
            return item

        return add

    def get(self, kind: str, where: str = "") -> T:
        try:
            return self._items[kind]
        except KeyError:
            raise ScenarioError(where or self.what, f"unknown {self.what} kind {kind!r}",
                                f"use one of: {', '.join(sorted(self._items))}") from None

    def kinds(self) -> list[str]:
        return sorted(self._items)

    def unregister(self, kind: str) -> None:
        """Remove a kind (tests that register plug-ins clean up after themselves)."""
        self._items.pop(kind, None)
