"""Registration of built-in and third-party components.

``vla`` core never imports heads, tokenizers or selectors directly: it imports the packages that
register them here, by name. Third-party packages can add theirs through the ``vla.plugins`` entry
point group (each entry point is a module to import).
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN = (
    "vla.backbones.timm_lm",
    "vla.backbones.hf_vlm",
    "policies",
    "action_tokenizers",
    "robots.base",  # registers the built-in drivers (the `robots` package itself imports nothing)
)
_loaded = False


def load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    import os

    skip = set(filter(None, os.environ.get("VLA_SKIP_PLUGINS", "").split(",")))  # dev escape hatch
    for mod in BUILTIN:
        if mod not in skip:
            importlib.import_module(mod)
    for ep in entry_points(group="vla.plugins"):
        importlib.import_module(ep.value)
    _loaded = True
