"""The ``ActionHead`` contract shared by every head (flow matching, discrete tokens, coarse-to-fine).

Heads read the backbone's :class:`~vla.types.Prefix` (computed once) and never run the backbone's
prefix pass themselves. The policy puts the normalized robot state and the valid-action-dim mask into
``prefix.extras`` (keys ``"state"`` (B, S), ``"state_mask"`` (B, S), ``"action_dim_mask"`` (B, A)).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vla.backbones.base import Backbone
from vla.types import Prefix


class ActionHead(nn.Module):
    action_dim: int  # A (the model's max action dim; padded dims are masked)
    chunk_size: int  # H

    def loss(self, backbone: Backbone, prefix: Prefix, actions: Tensor, is_pad: Tensor, **kw) -> Tensor:
        """actions (B, H, A) normalized, is_pad (B, H) bool -> per-step loss (B, H), UNREDUCED.

        Padded steps are exactly 0. DPO / reward-weighted regression reuse this per-sample loss.
        """
        raise NotImplementedError

    def sample(
        self,
        backbone: Backbone,
        prefix: Prefix,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """-> (B, N, H, A) normalized action chunks; N candidates share one prefix pass."""
        raise NotImplementedError


def masked_step_mean(err: Tensor, is_pad: Tensor, dim_mask: Tensor | None) -> Tensor:
    """Mean over valid action dims, zero on padded steps: err (B, H, A) -> (B, H)."""
    if dim_mask is None:
        per = err.mean(-1)
    else:
        m = dim_mask[:, None, :].to(err.dtype)
        per = (err * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return per * (~is_pad.bool()).to(per.dtype)
