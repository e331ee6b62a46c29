"""``gated``: another selector's choice for the instructions where validation showed it helps; elsewhere the first
candidate, which is what the policy executes without selection.

Why this exists: a selector can help on most tasks and hurt one badly. On MetaWorld MT10 the ``dagger`` selector
raised pick-place from 10-13 to 40-47% and dropped peg-insert-side from 27-33 to 3-10% in every run. Watching the
peg-insert episodes showed why: it grasps the peg more often, but it then copies what the scripted expert does
from a grip that sits 2-3 cm above the peg (there the expert lowers the hand onto the peg again), so the arm
holds the peg in the air until the episode ends. The selector is only as good as its labels, and where they
mislead, the policy alone does better. Which instructions those are is measured, not guessed: play the policy
with and without the selector on TRAINING variations (``python -m benchmarks.metaworld.selector_gate``), and
switch selection off where it lost. The held-out variations never decide.

    python -m benchmarks.metaworld.selector_gate --policy P --selector dagger --selector.path D --num-samples 16
        # -> D/gate.json: the instructions it is switched off for, and the paired evidence per task
    vla eval metaworld --policy P --selector gated --selector.path D --num-samples 16

The gate compares the observation's prompt token ids with those of the switched-off instructions (tokenized
once by the policy's own tokenizer), so it works wherever selectors do: ``vla eval``, the chunk broker, serving.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policies.selectors.base import (
    ChunkSelector,
    SelectorConfig,
    _takes_reference_start,
    resolve_selector,
    selector_config_class,
)
from vla.types import Observation, Prefix

GATE_FILE = "gate.json"  # in the gated selector's folder, next to the inner selector's assets


def prompt_keys(ids: Tensor, mask: Tensor) -> list[tuple[int, ...]]:
    """(B, L) token ids and their (B, L) mask -> one hashable key per row: the real tokens, in order."""
    return [tuple(int(t) for t in row[m]) for row, m in zip(ids.cpu(), mask.bool().cpu())]


class GatedSelector(ChunkSelector):
    """score = the inner selector's scores, except for observations whose instruction is switched off: there
    the first candidate scores 0 and the others -1 (the first candidate is executed, as without selection)."""

    name = "gated"

    def __init__(self, inner: ChunkSelector, off_keys: set[tuple[int, ...]], off: list[str] | None = None,
                 path: str | None = None):
        if isinstance(inner, GatedSelector):
            raise ValueError("selector 'gated': the inner selector is itself gated; gate the selector it wraps")
        self.inner, self.off_keys, self.off, self.path = inner, set(off_keys), list(off or []), path
        self.needs_features, self.needs_reference = inner.needs_features, inner.needs_reference

    def gated(self, obs: Observation | None, batch: int) -> Tensor:
        """(B,) bool: True where selection is switched off for the observation's instruction."""
        if not self.off_keys:
            return torch.zeros(batch, dtype=torch.bool)
        ids, mask = getattr(obs, "prompt_ids", None), getattr(obs, "prompt_mask", None)
        if ids is None or mask is None:
            raise ValueError("selector 'gated' reads the instruction: pass obs= with prompt_ids and prompt_mask to "
                             "select() (sample_and_select and VLAPolicy.predict_action_chunk do)")
        return torch.tensor([k in self.off_keys for k in prompt_keys(ids, mask)], dtype=torch.bool)

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None, reference: Tensor | None = None, reference_start: int = 0) -> Tensor:
        off = self.gated(obs, candidates.shape[0]).to(candidates.device)
        if bool(off.all()):  # nothing to score: skip the inner selector's work
            inner = torch.zeros(candidates.shape[:2], device=candidates.device)
        else:
            kw: dict[str, Any] = {}
            if self.inner.needs_reference:  # what ChunkSelector.select would pass the inner selector itself
                kw["reference"] = reference
                if _takes_reference_start(type(self.inner)):
                    kw["reference_start"] = reference_start
            inner = self.inner.score(candidates, obs=obs, prefix=prefix, features=features, **kw).float()
        first = torch.full_like(inner, -1.0)
        first[:, 0] = 0.0
        return torch.where(off[:, None], first, inner)


@SelectorConfig.register_subclass("gated")
@dataclass
class GatedConfig(SelectorConfig):
    # Folder with gate.json (written by `python -m benchmarks.metaworld.selector_gate`): the inner selector's
    # config and the instructions selection is switched off for; the inner selector's assets lie in the same folder.
    path: str | None = None

    def build(self, policy: Any = None) -> GatedSelector:
        if self.path is None:
            raise ValueError("selector 'gated' needs --selector.path=DIR, a folder with gate.json (write one with "
                             "`python -m benchmarks.metaworld.selector_gate`)")
        folder = Path(self.path)
        if not (folder / GATE_FILE).is_file():
            raise FileNotFoundError(f"selector 'gated': {folder / GATE_FILE} is missing (write it with `python -m "
                                    "benchmarks.metaworld.selector_gate --policy P --selector NAME --selector.path "
                                    f"{folder}`)")
        gate = json.loads((folder / GATE_FILE).read_text())
        inner_spec = dict(gate.get("selector") or {})
        if inner_spec.get("type") in (None, "gated"):
            raise ValueError(f"selector 'gated': {folder / GATE_FILE} must name the inner selector under "
                             f"'selector' (e.g. {{\"type\": \"dagger\"}}), received {gate.get('selector')!r}")
        if "path" in selector_config_class(str(inner_spec["type"])).__dataclass_fields__:
            inner_spec["path"] = str(folder)  # the inner selector's assets lie next to the gate
        inner = resolve_selector(inner_spec, policy)
        off = [str(t) for t in gate.get("off", [])]
        keys: set[tuple[int, ...]] = set()
        if off:
            pre = getattr(policy, "preprocessor", None)
            if getattr(pre, "tokenize", None) is None:
                raise ValueError("selector 'gated' switches selection off by instruction and needs the policy's "
                                 "tokenizer: build it with the policy (VLAPolicy.predict_action_chunk does)")
            ids, mask = pre.tokenize(off, pre.cfg.max_prompt_len)  # as the preprocessor tokenizes an observation
            keys = set(prompt_keys(ids, mask))
        return GatedSelector(inner, keys, off, str(folder))
