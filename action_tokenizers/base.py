"""The ``ActionTokenizer`` contract, its config registry, and saving/loading by name.

A tokenizer turns normalized action chunks ``(N, H, A)`` into integer codes and back:

    tok = TokenizerConfig.get_choice_class("fast")(vocab_size=512).build()
    tok.fit(chunks)                           # (N, H, A) float
    codes, mask = tok.encode(chunks)          # (N, L) int64, (N, L) bool (False = padding)
    actions, valid = tok.decode(codes, mask)  # (N, H, A) float64, (N,) bool
    tok.save_pretrained("tok/"); tok = ActionTokenizer.from_pretrained("tok/")

Why ``decode`` returns ``valid``: an autoregressive head can sample any code sequence, and some do
not describe a chunk (a FAST string of the wrong length, a bin index out of range). Those rows get
``valid=False`` and are filled with NaN, so code that forgets to look at ``valid`` fails loudly
instead of sending a robot silent zeros.

Configs are a draccus ``ChoiceRegistry`` like ``HeadConfig``, so ``--tokenizer.type=fast
--tokenizer.vocab_size=1024`` works from the CLI, and a saved tokenizer records its ``type``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import draccus
import numpy as np

from vla.config import register_choice_field
from vla.registry import choice_class, choice_names

CONFIG_FILE = "tokenizer_config.json"
STATE_FILE = "tokenizer_state.safetensors"


@dataclass
class TokenizerConfig(draccus.ChoiceRegistry):
    """Base of all tokenizer configs. Subclasses implement ``build() -> ActionTokenizer`` and
    ``tiny()`` (a small instance the parametrized tests run through every generic test)."""

    @classmethod
    def tiny(cls) -> "TokenizerConfig":  # pragma: no cover - abstract
        raise NotImplementedError(f"{cls.__name__}.tiny")

    def build(self) -> "ActionTokenizer":  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.build")

    @property
    def type(self) -> str:
        return self.get_choice_name(type(self))


def tokenizer_names() -> list[str]:
    return choice_names(TokenizerConfig)


def tokenizer_config_class(name: str) -> type[TokenizerConfig]:
    """The config class registered as ``name``; an unknown name lists the known ones (did-you-mean)."""
    return choice_class("tokenizer", TokenizerConfig, name)


def make_tokenizer(name: str, **fields: Any) -> "ActionTokenizer":
    """``make_tokenizer("uniform", n_bins=256)`` -> an unfitted tokenizer."""
    return tokenizer_config_class(name)(**fields).build()


def as_chunks(actions: Any, name: str = "actions") -> np.ndarray:
    """numpy / torch / nested lists ``(N, H, A)`` -> float64 array, with clear errors on bad input."""
    if hasattr(actions, "detach"):  # torch tensor, without importing torch here
        actions = actions.detach().cpu().float().numpy()
    x = np.asarray(actions, dtype=np.float64)
    if x.ndim != 3 or x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, H, A) array of action chunks, got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        n, t, a = np.argwhere(bad)[0]
        raise ValueError(f"{name}: {int(bad.sum())} non-finite values (first at chunk {n}, step {t}, dim {a})")
    return x


class ActionTokenizer:
    """Base class: subclasses implement ``_fit``, ``_encode``, ``_decode`` and the state hooks.

    The base class owns what every tokenizer shares: input checks, the fitted chunk shape
    ``(horizon, action_dim)``, NaN-filling of invalid rows, and the on-disk layout
    (``tokenizer_config.json`` with ``type`` + config fields + shape, ``tokenizer_state.safetensors``).
    """

    def __init__(self, config: TokenizerConfig):
        self.config = config
        self.horizon: int | None = None  # H, set by fit
        self.action_dim: int | None = None  # A, set by fit

    # --- the contract ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError(f"{type(self).__name__}.vocab_size")

    @property
    def is_fitted(self) -> bool:
        return self.horizon is not None

    def fit(self, actions: Any) -> None:
        """Fit to normalized chunks ``(N, H, A)``; fixes ``horizon`` and ``action_dim``."""
        x = as_chunks(actions)
        self.horizon, self.action_dim = int(x.shape[1]), int(x.shape[2])
        self._fit(x)

    def encode(self, actions: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(N, H, A)`` -> codes ``(N, L)`` int64 and mask ``(N, L)`` bool (False = padding)."""
        x = self._check_shape(as_chunks(actions))
        codes, mask = self._encode(x)
        return np.asarray(codes, dtype=np.int64), np.asarray(mask, dtype=bool)

    def decode(self, codes: Any, mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """codes ``(N, L)`` (+ mask, default all True) -> actions ``(N, H, A)``, valid ``(N,)``.

        Rows that do not decode get ``valid=False`` and NaN actions (never silent zeros)."""
        self._require_fitted("decode")
        if hasattr(codes, "detach"):
            codes = codes.detach().cpu().numpy()
        if mask is not None and hasattr(mask, "detach"):
            mask = mask.detach().cpu().numpy()
        codes = np.asarray(codes)
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes: expected an integer (N, L) array, got shape {codes.shape} dtype {codes.dtype}")
        mask = np.ones(codes.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != codes.shape:
            raise ValueError(f"mask: expected shape {codes.shape} (the codes' shape), got {mask.shape}")
        actions, valid = self._decode(codes.astype(np.int64), mask)
        actions = np.asarray(actions, dtype=np.float64).copy()
        actions[~valid] = np.nan
        return actions, np.asarray(valid, dtype=bool)

    # --- subclass hooks -------------------------------------------------------------------------
    def _fit(self, x: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, codes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _state(self) -> dict[str, np.ndarray]:
        """Arrays that, with the config and shape, reproduce the fitted tokenizer exactly."""
        return {}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        pass

    def _save_extra(self, path: Path) -> None:
        """Non-array files (FAST's BPE json)."""

    def _load_extra(self, path: Path) -> None:
        pass

    # --- helpers --------------------------------------------------------------------------------
    # Codes laid out one (step, dim) per position, time-major (``t * A + a``): a step's loss is its own
    # codes' loss. False for tokenizers whose codes describe the whole chunk (FAST, multi-scale VQ).
    codes_per_step: bool = False
    @property
    def tokens_per_step(self) -> int:
        """Codes per action step of a ``codes_per_step`` layout: A, fewer when dims share a joint token."""
        return self.action_dim

    # Every chunk takes the same number of codes (False for FAST: BPE lengths vary, heads add an EOS).
    fixed_length: bool = True

    def allowed_codes(self, length: int) -> np.ndarray | None:
        """(length, vocab_size) bool: which ids may appear at each position (None = any id anywhere).
        Heads mask their logits with it so that sampling cannot produce an undecodable row."""
        return None

    def code_values(self) -> np.ndarray | None:
        """``(H * tokens_per_step, vocab_size)`` float: the action value each id decodes to at each code position,
        for tokenizers whose positions decode independently to ONE value each (per-dimension bins: uniform,
        adaptive grid without the spherical joint token). Heads use it to decode the expected value under their
        predicted distribution instead of the argmax code (``head.greedy='expected'``). Ids not allowed at a
        position (``allowed_codes``) hold 0: heads mask them, so they get no probability. None = not per-position
        (FAST's BPE, multi-scale VQ, joint tokens)."""
        return None

    def length_constraint(self) -> tuple[np.ndarray, int] | None:
        """For variable-length tokenizers whose rows decode only at an exact total: ``(lengths, total)``,
        how many units each id (``(vocab_size,)`` int) decodes to and the total a decodable row adds up to
        (FAST: characters = DCT coefficients, total ``H * A``). Heads use it to constrain decoding so that
        every sampled row decodes. None = no such constraint (fixed-length tokenizers)."""
        return None

    def _require_fitted(self, what: str) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__}.{what}: the tokenizer is not fitted; call fit(actions) "
                               f"or load one with ActionTokenizer.from_pretrained(path)")

    def _check_shape(self, x: np.ndarray) -> np.ndarray:
        self._require_fitted("encode")
        if x.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(f"actions: expected chunks of shape (N, {self.horizon}, {self.action_dim}) "
                             f"(the fitted horizon and action_dim), got {x.shape}")
        return x

    def _fixed_length_checks(self, codes: np.ndarray, mask: np.ndarray, length: int, vocab: int) -> np.ndarray:
        """For fixed-length code layouts: a wrong L is a caller error; out-of-range codes or a
        padded position make only that row invalid. Returns ``valid`` (N,)."""
        if codes.shape[1] != length:
            raise ValueError(f"codes: {type(self).__name__} uses exactly {length} codes per chunk, "
                             f"got codes of shape {codes.shape}")
        return mask.all(axis=1) & ((codes >= 0) & (codes < vocab)).all(axis=1)

    # --- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        self._require_fitted("save_pretrained")
        from safetensors.numpy import save_file

        from vla.config import to_dict

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = to_dict(self.config)
        cfg["type"] = self.config.type
        meta = {"type": self.config.type, "config": cfg, "horizon": self.horizon, "action_dim": self.action_dim}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        save_file({k: np.ascontiguousarray(v) for k, v in self._state().items()}, str(path / STATE_FILE))
        self._save_extra(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ActionTokenizer":
        """Load any saved tokenizer: dispatches on the saved ``type`` (unknown types list the known ones)."""
        from safetensors.numpy import load_file

        from vla.config import from_dict

        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a saved action tokenizer: {CONFIG_FILE} is missing")
        meta = json.loads((path / CONFIG_FILE).read_text())
        tokenizer_config_class(meta["type"])  # an unknown (e.g. unregistered plugin) type: lists the known ones
        tok = from_dict(TokenizerConfig, {**meta["config"], "type": meta["type"]}).build()
        if cls is not ActionTokenizer and not isinstance(tok, cls):
            raise TypeError(f"{str(path)!r} holds a {meta['type']!r} tokenizer ({type(tok).__name__}), "
                            f"not a {cls.__name__}")
        tok.horizon, tok.action_dim = int(meta["horizon"]), int(meta["action_dim"])
        tok._load_state(dict(load_file(str(path / STATE_FILE))))
        tok._load_extra(path)
        return tok


# `--tokenizer.type=...` on the command line is checked against the registered names.
register_choice_field("tokenizer", TokenizerConfig)
