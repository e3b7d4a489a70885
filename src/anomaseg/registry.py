"""A name -> constructor registry (after timm's): explicit names, an error on duplicates, and the
built-in entries imported explicitly on first lookup rather than by import side effects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Entry:
    name: str
    constructor: Callable
    description: str
    tiny: dict = field(default_factory=dict)  # small configuration for tests


class Registry:
    def __init__(self, kind: str, load_builtins: Callable[[], None]):
        self.kind = kind
        self._load_builtins = load_builtins
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, description: str, tiny: dict | None = None):
        def decorator(constructor):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered "
                                 f"(by {self._entries[name].constructor!r})")
            self._entries[name] = Entry(name, constructor, description, dict(tiny or {}))
            return constructor

        return decorator

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        self._load_builtins()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def build(self, name: str, **params):
        """Call the registered constructor; a wrong keyword becomes a TypeError naming the entry."""
        entry = self.entry(name)
        try:
            return entry.constructor(**params)
        except TypeError as exc:
            raise TypeError(f"{self.kind} {name!r}: {exc}") from None
