"""The ``ChunkSelector`` contract, its config registry, and sampling-then-selecting in one call.

Test-time selection (TACO-style "generate then verify"): the head samples N candidate chunks from ONE
backbone pass, a selector scores them, and the best one is executed.

    sel = make_selector("consistency")
    chunk, scores = sel.select(candidates, obs=obs, prefix=prefix, features=features)
    # candidates (B, N, H, A) normalized -> chunk (B, H, A), scores (B, N), higher = preferred

Selectors register with ``@SelectorConfig.register_subclass("name")`` (a draccus choice registry, so
``--selector.type=cfn --selector.path=...`` works on any command that has a ``selector`` field) and
build with ``config.build(policy)``; the policy is how a selector finds assets saved with a checkpoint
(``pretrained_model/selector/``, e.g. the fitted CFN).
"""
from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import draccus
import torch
from torch import Tensor

from vla.config import from_dict, register_choice_field, to_dict
from vla.policy import SELECTOR_DIR  # noqa: F401  (re-exported: policies.selectors.SELECTOR_DIR)
from vla.registry import choice_class, choice_names
from vla.types import Observation, Prefix

# SELECTOR_DIR: inside a checkpoint's pretrained_model/ (vla.policy sets policy.selector_dir).
SELECTOR_CONFIG = "selector_config.json"


@dataclass
class SelectorConfig(draccus.ChoiceRegistry):
    """Base of all selector configs. Subclasses implement ``build(policy) -> ChunkSelector``."""

    def build(self, policy: Any = None) -> ChunkSelector:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.build")

    @property
    def type(self) -> str:
        return self.get_choice_name(type(self))


register_choice_field("selector", SelectorConfig)


def selector_names() -> list[str]:
    return choice_names(SelectorConfig)


def selector_config_class(name: str) -> type[SelectorConfig]:
    """The config class registered as ``name``; an unknown name lists the known ones (did-you-mean)."""
    return choice_class("selector", SelectorConfig, name)


def make_selector(name: str, policy: Any = None, **fields: Any) -> ChunkSelector:
    """``make_selector("cfn", policy)`` -> a ready selector (``fields`` go to its config)."""
    return selector_config_class(name)(**fields).build(policy)


class ChunkSelector:
    """Scores N candidate chunks per observation and returns the best one.

    Deliberately not an ``nn.Module``: a selector attached to a ``VLAPolicy`` must never become part of
    the policy's state dict (checkpoints without a selector would stop loading). Selectors that own a
    network keep it as a plain attribute and move it to the candidates' device when they score.
    """

    name: str = "?"
    needs_features: bool = False  # True: ``select`` needs the head's features (B, N, H, W)
    # True: ``score`` also takes ``reference`` (B, H', A), the previous chunk's not-yet-executed actions
    # (normalized, padded like the candidates; None at an episode's first chunk).
    needs_reference: bool = False

    def score(self, candidates: Tensor, *, obs: Observation | None, prefix: Prefix | None,
              features: Tensor | None) -> Tensor:
        """candidates (B, N, H, A) -> scores (B, N), higher = preferred."""
        raise NotImplementedError(f"{type(self).__name__}.score")

    def select(self, candidates: Tensor, *, obs: Observation | None = None, prefix: Prefix | None = None,
               features: Tensor | None = None, reference: Tensor | None = None,
               reference_start: int = 0) -> tuple[Tensor, Tensor]:
        """candidates (B, N, H, A) -> (chunk (B, H, A), scores (B, N)); chunk[b] = candidates[b, argmax scores[b]].

        ``reference`` (B, H', A): the actions still planned from the previous chunk for the candidates' steps
        ``reference_start .. reference_start + H' - 1`` (<= H) (selectors with ``needs_reference`` use it;
        others ignore it). An asynchronous client starts it after the steps that will be late anyway.
        A candidate with a non-finite value is never chosen (its score becomes -inf); if every candidate
        of an observation is non-finite this raises instead of handing NaN to a robot.
        """
        check_candidates(candidates, self.name)
        if self.needs_features:
            check_features(features, candidates, self.name)
        kw: dict[str, Any] = {}
        if self.needs_reference:
            if reference is not None:
                check_reference(reference, candidates, self.name, reference_start)
            kw["reference"] = reference
            if _takes_reference_start(type(self)):
                kw["reference_start"] = reference_start
            elif reference is not None and reference_start:
                raise ValueError(f"selector {self.name!r}: its score() takes no reference_start, so it cannot compare a "
                                 f"plan that starts at step {reference_start}; pass the plan from step 0")
        # Scoring runs in fp32 even inside the policy's bf16 inference autocast: the scorers are tiny, and
        # bf16-rounded scores would tie near-equal candidates (argmax then favours the lowest index).
        with torch.autocast(candidates.device.type, enabled=False):
            scores = self.score(candidates, obs=obs, prefix=prefix, features=features, **kw).float()
        b, n = candidates.shape[:2]
        if tuple(scores.shape) != (b, n):
            raise ValueError(f"selector {self.name!r}: score() returned shape {tuple(scores.shape)}, expected ({b}, {n})")
        finite = torch.isfinite(candidates.float()).flatten(2).all(-1)  # (B, N)
        if not bool(finite.any(1).all()):
            bad = [int(i) for i in torch.nonzero(~finite.any(1)).flatten()]
            raise FloatingPointError(f"selector {self.name!r}: every candidate chunk of batch items {bad} is non-finite")
        # NaN scores (a diverged scorer) rank last, like non-finite candidates.
        scores = torch.where(finite & ~torch.isnan(scores), scores, torch.full_like(scores, -torch.inf))
        # A scorer that one non-finite candidate poisoned for the whole observation (NaN everywhere) must not
        # fall back to index 0, which may be that candidate: take the first finite one instead.
        lost = ~(scores > -torch.inf).any(1)
        pick = torch.where(lost[:, None] & finite, torch.zeros_like(scores), scores)
        idx = pick.argmax(dim=1)
        chunk = candidates[torch.arange(b, device=candidates.device), idx]
        return chunk, scores

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``selector_config.json`` (type + config fields) and the selector's own assets."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        data = to_dict_with_type(self.config())
        data.pop("path", None)  # assets are read from wherever the folder ends up (load_selector sets it)
        (path / SELECTOR_CONFIG).write_text(json.dumps(data, indent=2))
        self._save_assets(path)
        return path

    def config(self) -> SelectorConfig:
        """The config that rebuilds this selector (assets are read from the folder it is saved in)."""
        return selector_config_class(self.name)()

    def _save_assets(self, path: Path) -> None:
        """Selectors with fitted state (CFN) write it here."""


def to_dict_with_type(cfg: SelectorConfig) -> dict:
    d = to_dict(cfg)
    d["type"] = cfg.type
    return d


def load_selector(path: str | Path, policy: Any = None) -> ChunkSelector:
    """Rebuild a selector saved by :meth:`ChunkSelector.save_pretrained` (its ``path`` points at ``path``)."""
    path = Path(path)
    file = path / SELECTOR_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a saved selector: no {SELECTOR_CONFIG} in it "
                                "(write one with `vla post-train cfn --policy ... --dataset ...`)")
    data = json.loads(file.read_text())
    name = data.pop("type", None)
    cls = selector_config_class(str(name))
    if "path" in {f.name for f in cls.__dataclass_fields__.values()}:
        data["path"] = str(path)
    return from_dict(cls, data).build(policy)


def check_candidates(candidates: Any, who: str) -> None:
    if not isinstance(candidates, Tensor) or candidates.ndim != 4:
        shape = tuple(candidates.shape) if hasattr(candidates, "shape") else type(candidates).__name__
        raise ValueError(f"selector {who!r}: candidates must be a (B, N, H, A) tensor, got {shape}")
    if 0 in candidates.shape:
        raise ValueError(f"selector {who!r}: candidates must be non-empty (B, N, H, A), got {tuple(candidates.shape)}")


def check_features(features: Any, candidates: Tensor, who: str) -> None:
    b, n = candidates.shape[:2]
    if features is None:
        raise ValueError(f"selector {who!r} scores the head's features: pass features (B, N, H, W) "
                         "(head.sample(..., return_features=True))")
    if not isinstance(features, Tensor) or features.ndim != 4 or tuple(features.shape[:2]) != (b, n):
        shape = tuple(features.shape) if hasattr(features, "shape") else type(features).__name__
        raise ValueError(f"selector {who!r}: features must be ({b}, {n}, T, W) like the candidates, got {shape}")


@functools.lru_cache(maxsize=None)
def _takes_reference_start(cls: type) -> bool:
    """Whether a selector class's ``score`` takes ``reference_start`` (those written before it existed do
    not). Once per class: ``select`` runs for every chunk."""
    from policies.broker import accepts_keyword

    return accepts_keyword(cls.score, "reference_start")


def check_reference(reference: Any, candidates: Tensor, who: str, start: int = 0) -> None:
    b, _, h, a = candidates.shape
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < h:
        raise ValueError(f"selector {who!r}: reference_start must be an int in [0, {h}), got {start!r}")
    ok = (isinstance(reference, Tensor) and reference.ndim == 3 and reference.shape[0] == b
          and 1 <= reference.shape[1] <= h - start and reference.shape[2] == a)
    if not ok:
        shape = tuple(reference.shape) if hasattr(reference, "shape") else type(reference).__name__
        raise ValueError(f"selector {who!r}: reference must be ({b}, H', {a}) with 1 <= H' <= {h - start} "
                         f"(the previous chunk's remaining actions from step {start}), got {shape}")
    if not bool(torch.isfinite(reference).all()):
        raise ValueError(f"selector {who!r}: reference has NaN/inf values")


# --- the policy-level entry point ---------------------------------------------------------------
_RESOLVED: weakref.WeakKeyDictionary[Any, dict[str, ChunkSelector]] = weakref.WeakKeyDictionary()


def resolve_selector(spec: Any, policy: Any = None) -> ChunkSelector:
    """A selector from a name (``"cfn"``), a :class:`SelectorConfig` or a :class:`ChunkSelector`.

    Names are built once per policy and cached (a CFN is read from disk once, not per chunk).
    """
    if isinstance(spec, ChunkSelector):
        return spec
    if isinstance(spec, SelectorConfig):
        return spec.build(policy)
    if isinstance(spec, dict):  # a config map, e.g. {"type": "cfn", "path": "..."} from a server request
        if "type" not in spec:
            raise ValueError(f"selector: a config map needs a 'type' ({', '.join(selector_names())}), "
                             f"received keys {sorted(spec)}")
        key = json.dumps(spec, sort_keys=True, default=str)
        build = lambda: from_dict(selector_config_class(str(spec["type"])),
                                  {k: v for k, v in spec.items() if k != "type"}).build(policy)
    elif isinstance(spec, str):
        key, build = spec, lambda: make_selector(spec, policy)
    else:
        raise TypeError(f"selector: expected a name ({', '.join(selector_names())}), a config map, a "
                        f"SelectorConfig or a ChunkSelector, received {type(spec).__name__}")
    if policy is None:
        return build()
    cache = _RESOLVED.setdefault(policy, {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


@torch.no_grad()
def sample_and_select(policy: Any, obs: Observation, num_samples: int, selector: Any,
                      generator: torch.Generator | None = None, reference: Tensor | None = None,
                      reference_start: int = 0, **head_kw: Any) -> tuple[Tensor, Tensor]:
    """ONE backbone pass, ``num_samples`` candidates from the head, the selector's choice.

    -> chunk (B, H, A) normalized, scores (B, N). This is what ``VLAPolicy.predict_action_chunk(raw,
    num_samples=N, selector=...)`` runs.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected an int >= 1, received {num_samples!r}")
    sel = resolve_selector(selector, policy)
    prefix = policy.encode(obs, policy._dim_mask(obs.batch_size, obs.device))
    kw: dict[str, Any] = {"num_samples": num_samples, "generator": generator, **head_kw}  # e.g. guide= (RTC)
    if sel.needs_features:
        candidates, features = policy.head.sample(policy.backbone, prefix, return_features=True, **kw)
    else:
        candidates, features = policy.head.sample(policy.backbone, prefix, **kw), None
    return sel.select(candidates, obs=obs, prefix=prefix, features=features, reference=reference,
                      reference_start=reference_start)
