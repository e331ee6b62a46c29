"""Adaptive Gaussian action grids (SpatialVLA).

Uniform bins waste tokens: most actions sit near the mean, so most bins of a uniform grid are
rarely used. SpatialVLA fits a Gaussian per dimension and places bin edges at equal-probability
quantiles of it, so every token is used about equally often and bins are narrow where data is dense.

* Fit: per dimension mean ``mu`` and std ``sigma`` (floored at ``min_sigma``, so a constant dimension
  gets a narrow grid instead of NaN).
* Edges: ``mu + sigma * ndtri(p)`` for ``p = linspace(tail_prob, 1 - tail_prob, n_bins + 1)``. The
  outermost ``tail_prob`` of each side is clipped into the edge bins, which keeps every bin finite.
* Decode (``centre``): ``"midpoint"`` (default) = the middle of the bin in value space, so the
  round-trip error within the grid is at most half the bin's width; ``"conditional_mean"`` =
  E[x | x in bin] under the fitted Gaussian, the least-squares choice for Gaussian data.
* Vocabulary: each dimension has its own ``n_bins`` tokens (code ``a * n_bins + k``), because a bin
  index means a different value in each dimension; a chunk is ``H * A`` tokens, time-major.
* ``refit(new_actions, old_embeddings)``: fit to a new dataset and move the old per-token embeddings
  onto the new bin centres by linear interpolation in value space (SpatialVLA's grid re-initialization
  for a new robot), so fine-tuning starts from embeddings that mean nearby values.

* ``spherical_dims=[0, 1, 2]``: SpatialVLA's spherical translation grid (``action_tokenizers/spherical.py``):
  those three dims become ONE joint (theta, phi, r) token per step with ``spherical_bins`` bins per
  coordinate; the other dims keep their own Gaussian grids. A step is then ``A - 2`` tokens: the joint
  translation token first (ids ``[0, T)``, ``T = prod(spherical_bins)``), then the other dims in order
  (ids ``T + j * n_bins + k``). ``refit`` moves the joint embeddings trilinearly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from action_tokenizers.base import ActionTokenizer, TokenizerConfig, as_chunks
from action_tokenizers.spherical import SphericalGrid, axis_interpolation, trilinear_weights

CENTRES = ("midpoint", "conditional_mean")


@TokenizerConfig.register_subclass("adaptive_grid")
@dataclass
class AdaptiveGridConfig(TokenizerConfig):
    n_bins: int = 256  # per dimension
    min_sigma: float = 1e-3
    tail_prob: float = 1e-3  # probability mass beyond each outer edge (clipped into the edge bin)
    centre: str = "midpoint"  # "midpoint" | "conditional_mean"
    # Three dims (x, y, z translation) to grid jointly in spherical coordinates; empty = off.
    spherical_dims: list[int] = field(default_factory=list)
    spherical_bins: list[int] = field(default_factory=lambda: [16, 32, 8])  # theta, phi, r

    def vocab_bound(self, max_action_dim: int) -> int:
        """Largest vocabulary once fitted on up to ``max_action_dim`` dims (the head's table size)."""
        joint = int(np.prod(self.spherical_bins)) if self.spherical_dims else 0
        return joint + self.n_bins * max_action_dim

    @classmethod
    def tiny(cls) -> "AdaptiveGridConfig":
        return cls(n_bins=16)

    def build(self) -> "AdaptiveGridTokenizer":
        return AdaptiveGridTokenizer(self)


def _norm_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


class AdaptiveGridTokenizer(ActionTokenizer):
    config: AdaptiveGridConfig
    codes_per_step = True

    def __init__(self, config: AdaptiveGridConfig):
        if config.n_bins < 2:
            raise ValueError(f"adaptive_grid.n_bins: expected >= 2, got {config.n_bins}")
        if not 0.0 < config.tail_prob < 0.5 / config.n_bins:
            raise ValueError(f"adaptive_grid.tail_prob: expected 0 < tail_prob < 0.5 / n_bins "
                             f"(= {0.5 / config.n_bins:g}), got {config.tail_prob}")
        if config.centre not in CENTRES:
            raise ValueError(f"adaptive_grid.centre: expected one of {CENTRES}, got {config.centre!r}")
        if not config.min_sigma > 0:
            raise ValueError(f"adaptive_grid.min_sigma: expected > 0, got {config.min_sigma}")
        sd, sb = list(config.spherical_dims), list(config.spherical_bins)
        if sd and (len(sd) != 3 or len(set(sd)) != 3 or min(sd) < 0):
            raise ValueError(f"adaptive_grid.spherical_dims: expected 3 distinct dims (x, y, z) or [], got {sd}")
        if len(sb) != 3 or min(sb) < 2:
            raise ValueError(f"adaptive_grid.spherical_bins: expected 3 bin counts >= 2 (theta, phi, r), got {sb}")
        super().__init__(config)
        self.mu: np.ndarray | None = None  # (A,)
        self.sigma: np.ndarray | None = None  # (A,)
        self.sphere: SphericalGrid | None = None  # fitted when spherical_dims is set

    # --- layout: which dims are gridded alone, and where their ids start -------------------------------
    @property
    def free_dims(self) -> list[int]:
        """Dims with their own 1-D grid (all of them unless spherical_dims is set)."""
        return [a for a in range(self.action_dim) if a not in self.config.spherical_dims]

    @property
    def joint_vocab(self) -> int:
        return self.sphere.vocab_size if self.config.spherical_dims else 0

    @property
    def tokens_per_step(self) -> int:
        self._require_fitted("tokens_per_step")
        return len(self.free_dims) + int(bool(self.config.spherical_dims))

    @property
    def vocab_size(self) -> int:
        self._require_fitted("vocab_size")  # one token set per dimension: depends on A
        return self.joint_vocab + self.config.n_bins * len(self.free_dims)

    @property
    def edges(self) -> np.ndarray:
        """(A, n_bins + 1) bin edges per dimension, increasing."""
        from scipy.special import ndtri

        c = self.config
        z = ndtri(np.linspace(c.tail_prob, 1 - c.tail_prob, c.n_bins + 1))  # (n+1,)
        return self.mu[:, None] + self.sigma[:, None] * z[None, :]

    @property
    def centres(self) -> np.ndarray:
        """(A, n_bins) decoded value of each bin."""
        e = self.edges
        if self.config.centre == "midpoint":
            return (e[:, :-1] + e[:, 1:]) / 2
        # E[x | a < x < b] = mu + sigma * (pdf(alpha) - pdf(beta)) / (cdf(beta) - cdf(alpha))
        z = (e - self.mu[:, None]) / self.sigma[:, None]
        mass = (1 - 2 * self.config.tail_prob) / self.config.n_bins  # equal by construction
        return self.mu[:, None] + self.sigma[:, None] * (_norm_pdf(z[:, :-1]) - _norm_pdf(z[:, 1:])) / mass

    def _fit(self, x: np.ndarray) -> None:
        sd = list(self.config.spherical_dims)
        if sd and max(sd) >= x.shape[-1]:
            raise ValueError(f"adaptive_grid.spherical_dims: {sd} needs actions with more than {max(sd)} dims, "
                             f"got action_dim {x.shape[-1]}")
        flat = x.reshape(-1, x.shape[-1])
        self.mu = flat.mean(0)
        self.sigma = np.maximum(flat.std(0), self.config.min_sigma)
        if sd:
            self.sphere = SphericalGrid.fit(flat[:, sd], tuple(self.config.spherical_bins), self.config.min_sigma)

    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, free = self.config.n_bins, self.free_dims
        inner = self.edges[:, 1:-1]  # (A, n-1): values below inner[a, 0] -> bin 0, above the last -> n-1
        k = np.zeros((*x.shape[:2], len(free)), dtype=np.int64)  # (N, H, F); F = 0 when xyz is all there is
        for j, a in enumerate(free):
            k[..., j] = np.searchsorted(inner[a], x[..., a], side="right")
        per_step = self.joint_vocab + k + np.arange(len(free)) * n  # (N, H, F), code = T + j * n + k
        if self.config.spherical_dims:
            joint = self.sphere.encode(x[..., list(self.config.spherical_dims)])  # (N, H)
            per_step = np.concatenate([joint[..., None], per_step], axis=-1)
        codes = per_step.reshape(len(x), -1)  # (N, H * tokens_per_step), time-major
        return codes, np.ones(codes.shape, dtype=bool)

    def _slot_ranges(self) -> np.ndarray:
        """(tokens_per_step, 2) the [lo, hi) ids each slot of a step may hold."""
        n, t = self.config.n_bins, self.joint_vocab
        own = [(t + j * n, t + (j + 1) * n) for j in range(len(self.free_dims))]
        return np.array(([(0, t)] if self.config.spherical_dims else []) + own, dtype=np.int64)

    def _decode(self, codes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, A, n, S = self.horizon, self.action_dim, self.config.n_bins, self.tokens_per_step
        valid = self._fixed_length_checks(codes, mask, H * S, self.vocab_size)
        c = codes.reshape(-1, H, S)
        # a code must be a token of the slot at its position, not just any id below vocab_size
        r = self._slot_ranges()
        in_slot = (c >= r[:, 0]) & (c < r[:, 1])
        valid &= in_slot.reshape(len(c), -1).all(1)
        c = np.where(in_slot, c, r[:, 0])  # invalid rows decode to something finite, then become NaN
        out = np.empty((len(c), H, A))
        free = self.free_dims
        slots = c[..., int(bool(self.config.spherical_dims)):]
        k = slots - self.joint_vocab - np.arange(len(free)) * n
        if free:
            out[..., free] = self.centres[free, k]
        if self.config.spherical_dims:
            out[..., list(self.config.spherical_dims)] = self.sphere.decode(c[..., 0])
        return out, valid

    def code_values(self) -> np.ndarray | None:
        """(H * A, vocab): each dimension's ids decode to their bin centres at that dimension's positions;
        None with the spherical grid (its joint token decodes to three values)."""
        self._require_fitted("code_values")
        if self.config.spherical_dims:
            return None
        n, a = self.config.n_bins, self.action_dim
        step = np.zeros((a, self.vocab_size))
        for j in range(a):  # no joint token: slot j holds ids [j * n, (j + 1) * n) of dimension j
            step[j, j * n:(j + 1) * n] = self.centres[j]
        return np.tile(step, (self.horizon, 1))

    def allowed_codes(self, length: int) -> np.ndarray:
        """Position ``i`` holds a token of slot ``i % tokens_per_step`` (its dimension's id range)."""
        self._require_fitted("allowed_codes")
        r = self._slot_ranges()[np.arange(length) % self.tokens_per_step]  # (L, 2)
        ids = np.arange(self.vocab_size)[None, :]
        return (ids >= r[:, :1]) & (ids < r[:, 1:])

    def refit(self, new_actions: Any, old_embeddings: Any) -> Any:
        """Fit to ``new_actions`` (N, H, A) and map ``old_embeddings`` (A * n_bins, D) — one row per
        token of the old grid — onto the new grid: row ``(a, j)`` is the linear interpolation of the
        old dimension-``a`` embeddings at the new bin centre ``j`` (clamped at the old grid's ends).
        Returns ``(A * n_bins, D)`` of the same kind (numpy array or torch tensor) as the input."""
        self._require_fitted("refit")
        x = as_chunks(new_actions, "new_actions")
        if x.shape[2] != self.action_dim:
            raise ValueError(f"new_actions: expected action_dim {self.action_dim} (the old grid's), got {x.shape[2]}")
        n, v, t = self.config.n_bins, self.vocab_size, self.joint_vocab
        if tuple(old_embeddings.shape[:1]) != (v,) or len(old_embeddings.shape) != 2:
            raise ValueError(f"old_embeddings: expected shape ({v}, D) (one row per token), "
                             f"got {tuple(old_embeddings.shape)}")
        old_c, old_sphere, free = self.centres, self.sphere, self.free_dims  # (A, n), increasing per dimension
        self.fit(x)
        new_c = self.centres
        # Every new row is a weighted sum of old rows: (V, K) indices and weights, K = 2 (1-D) or 8 (joint).
        idx = np.zeros((v, 8), dtype=np.int64)
        w = np.zeros((v, 8))
        if self.config.spherical_dims:
            idx[:t], w[:t] = trilinear_weights(old_sphere, self.sphere)
        for j, a in enumerate(free):
            i, wr = axis_interpolation(old_c[a], new_c[a])
            rows = slice(t + j * n, t + (j + 1) * n)
            idx[rows, 0], idx[rows, 1] = t + j * n + i, t + j * n + i + 1
            w[rows, 0], w[rows, 1] = 1 - wr, wr
        if hasattr(old_embeddings, "detach"):  # torch: keep dtype/device (and autograd)
            import torch

            ti = torch.as_tensor(idx, device=old_embeddings.device)
            tw = torch.as_tensor(w, dtype=old_embeddings.dtype, device=old_embeddings.device)
            return (tw[..., None] * old_embeddings[ti]).sum(1)
        old = np.asarray(old_embeddings)
        return (w[..., None] * old[idx]).sum(1).astype(old.dtype, copy=False)

    def _state(self) -> dict[str, np.ndarray]:
        return {"mu": self.mu, "sigma": self.sigma, **(self.sphere.state() if self.sphere is not None else {})}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self.mu, self.sigma = state["mu"], state["sigma"]
        if self.config.spherical_dims:
            self.sphere = SphericalGrid.from_state(tuple(self.config.spherical_bins), state)
