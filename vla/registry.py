"""Name -> component registries with helpful errors.

Configs are draccus ``ChoiceRegistry`` dataclasses (``--head.type=flow_matching``); this module adds the
one thing draccus lacks: an error that lists the known names and suggests the closest one. Every
registry in the project goes through :func:`lookup`, so a typo anywhere reads the same way.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable


class UnknownNameError(KeyError):
    """Raised for an unknown registered name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would repr() the message and show the quotes
        return str(self.args[0])


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    msg = f"unknown {kind} {name!r}; known {kind}s: {', '.join(known) if known else '(none registered)'}"
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    if close:
        msg += f". Did you mean {close[0]!r}?"
    return msg


def lookup(kind: str, table: dict[str, Any], name: str) -> Any:
    if name not in table:
        raise UnknownNameError(unknown_name_message(kind, name, table))
    return table[name]


def choice_names(base: type) -> list[str]:
    """Registered subclass names of a draccus ChoiceRegistry base class."""
    return sorted(base._choice_registry.keys())  # type: ignore[attr-defined]


def choice_class(kind: str, base: type, name: str) -> type:
    """The config class registered under ``name`` in a draccus ChoiceRegistry, with a helpful error."""
    return lookup(kind, base._choice_registry, name)  # type: ignore[attr-defined]
