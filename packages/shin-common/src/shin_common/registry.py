"""One registry per extensible concept: a name, one registration line per variant.

Every method package chooses its variants (pruning methods, reconstruction techniques, intervention
criteria, optimizers, staleness schedules...) by name from a :class:`Registry`, the way PEFT maps a
``PeftType`` to its config and model classes: adding a variant is one ``@REGISTRY.register("name")``
line next to its code, and the command line, the config checks and ``--help`` pick it up.

>>> SCHEDULES = Registry("staleness schedule")
>>> @SCHEDULES.register("constant")
... def constant(stages): ...
>>> SCHEDULES.get("linear")   # doctest: +SKIP
ValueError: unknown staleness schedule 'linear'; expected one of: constant
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Variants of one kind by name, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; a name already taken is refused (no silent replacement)."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""

        def decorate(entry: T) -> T:
            return self.add(name, entry)

        return decorate

    def remove(self, name: str) -> T:
        """Unregister ``name`` (for tests and plugins that register temporarily)."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry registered as ``name``; an unknown name raises one line listing the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of: {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
