"""Core data types shared by every backbone, head, selector and robot.

``Observation`` is what the preprocessor hands the model (batched, normalized). ``Prefix`` is the
result of ONE backbone pass over images + language: every head call (every denoising step, every
decoding step, every one of N candidate chunks) reads it instead of re-running the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# Per-layer attention cache: tuple over layers of (key, value), each (B, kv_heads, T, head_dim).
KVCache = tuple[tuple[Tensor, Tensor], ...]


@dataclass
class Observation:
    """A batch of normalized observations.

    images:       camera -> (B, 3, H, W) float in [0, 1]
    image_masks:  camera -> (B,) bool; False for a camera missing in that sample
    state:        (B, S) normalized, zero-padded to the model's max state dim
    state_mask:   (B, S) bool; False on padded dims
    prompt_ids:   (B, L) long token ids from the backbone's tokenizer
    prompt_mask:  (B, L) bool
    image_features: camera -> (B, F, h, w) the frozen vision encoder's output for that camera, when a
                  feature cache (``vla/data/feature_cache.py``) already ran it; the backbone then skips
                  its encoder and ``images`` may be empty
    """

    images: dict[str, Tensor]
    image_masks: dict[str, Tensor]
    state: Tensor
    prompt_ids: Tensor
    prompt_mask: Tensor
    state_mask: Tensor | None = None
    image_features: dict[str, Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.state.shape[0])

    @property
    def device(self) -> torch.device:
        return self.state.device

    def to(self, device: torch.device | str) -> "Observation":
        return Observation(
            images={k: v.to(device) for k, v in self.images.items()},
            image_masks={k: v.to(device) for k, v in self.image_masks.items()},
            state=self.state.to(device),
            prompt_ids=self.prompt_ids.to(device),
            prompt_mask=self.prompt_mask.to(device),
            state_mask=None if self.state_mask is None else self.state_mask.to(device),
            image_features=None if self.image_features is None
            else {k: v.to(device) for k, v in self.image_features.items()},
        )


@dataclass
class Prefix:
    """The backbone's output over the observation prefix (images + language).

    hidden: (B, T, D) last-layer hidden states
    mask:   (B, T) bool, True on real (attendable) tokens
    kv:     per-layer (key, value), each (B, kv_heads, T, head_dim), keys already position-encoded
    positions: (B,) long, the position id the first suffix token takes (number of real prefix tokens)
    extras: backbone-specific tensors with a leading batch dim (e.g. pooled features)
    """

    hidden: Tensor
    mask: Tensor
    kv: KVCache
    positions: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    def _map(self, fn) -> "Prefix":
        return Prefix(
            hidden=fn(self.hidden),
            mask=fn(self.mask),
            kv=tuple((fn(k), fn(v)) for k, v in self.kv),
            positions=fn(self.positions),
            extras={k: fn(v) for k, v in self.extras.items()},
        )

    def repeat(self, n: int) -> "Prefix":
        """(B, ...) -> (B*n, ...), sample-major: rows [b*n, (b+1)*n) all come from item b.

        Pure tensor indexing; the backbone is not run again.
        """
        if n < 1:
            raise ValueError(f"Prefix.repeat: n must be >= 1, got {n}")
        if n == 1:
            return self
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def detach(self) -> "Prefix":
        return self._map(lambda t: t.detach())
