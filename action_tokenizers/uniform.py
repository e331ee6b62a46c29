"""Uniform per-dimension bins (OpenVLA / RT-2 style).

Each action dimension's range is taken from the fit data's 1st and 99th percentiles (robust to a
few outliers), split into ``n_bins`` equal-width bins; values outside the range are clipped into the
edge bins. Every (step, dim) of a chunk becomes one token, time-major: code ``t * A + a``, so a
chunk is ``H * A`` tokens. The vocabulary (``n_bins`` ids) is shared by all dimensions as in OpenVLA.
Decoding returns bin centres, so the round-trip error inside the range is at most half a bin width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from action_tokenizers.base import ActionTokenizer, TokenizerConfig


@TokenizerConfig.register_subclass("uniform")
@dataclass
class UniformConfig(TokenizerConfig):
    n_bins: int = 256
    low_quantile: float = 0.01
    high_quantile: float = 0.99
    min_width: float = 1e-6  # floor for a constant dimension's range: it gets one tiny range, never NaN

    @classmethod
    def tiny(cls) -> "UniformConfig":
        return cls(n_bins=16)

    def build(self) -> "UniformTokenizer":
        return UniformTokenizer(self)


class UniformTokenizer(ActionTokenizer):
    config: UniformConfig
    codes_per_step = True

    def __init__(self, config: UniformConfig):
        if config.n_bins < 2:
            raise ValueError(f"uniform.n_bins: expected >= 2, got {config.n_bins}")
        if not 0.0 <= config.low_quantile < config.high_quantile <= 1.0:
            raise ValueError(f"uniform.low_quantile/high_quantile: expected 0 <= low < high <= 1, "
                             f"got {config.low_quantile}, {config.high_quantile}")
        super().__init__(config)
        self.low: np.ndarray | None = None  # (A,)
        self.high: np.ndarray | None = None  # (A,)

    @property
    def vocab_size(self) -> int:
        return self.config.n_bins

    @property
    def bin_width(self) -> np.ndarray:
        """(A,) width of one bin per dimension."""
        return (self.high - self.low) / self.config.n_bins

    def _fit(self, x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1])
        lo, hi = np.quantile(flat, [self.config.low_quantile, self.config.high_quantile], axis=0)
        centre = (lo + hi) / 2
        half = np.maximum((hi - lo) / 2, self.config.min_width / 2)
        self.low, self.high = centre - half, centre + half

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.config.n_bins
        k = np.floor((x - self.low) / (self.high - self.low) * n)
        codes = np.clip(k, 0, n - 1).astype(np.int64).reshape(len(x), -1)  # (N, H*A), time-major
        return codes, np.ones(codes.shape, dtype=bool)

    def _decode(self, codes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, A = self.horizon, self.action_dim
        valid = self._fixed_length_checks(codes, mask, H * A, self.config.n_bins)
        k = np.clip(codes, 0, self.config.n_bins - 1).reshape(-1, H, A)
        return self.low + (k + 0.5) * self.bin_width, valid

    def code_values(self) -> np.ndarray:
        """(H * A, n_bins): bin k of the dimension at position l (time-major) decodes to its centre."""
        self._require_fitted("code_values")
        centres = self.low[:, None] + (np.arange(self.config.n_bins)[None] + 0.5) * self.bin_width[:, None]  # (A, n)
        return np.tile(centres, (self.horizon, 1))

    def _state(self) -> dict[str, np.ndarray]:
        return {"low": self.low, "high": self.high}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self.low, self.high = state["low"], state["high"]
