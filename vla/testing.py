"""Helpers for tests and benchmarks: random observations for a policy (no dataset needed)."""
from __future__ import annotations

import torch

from vla.types import Observation


def random_observation(policy, batch: int = 2, seed: int = 0, prompts: list[str] | None = None) -> Observation:
    """A normalized-space Observation with the policy's cameras, image size and state dim."""
    g = torch.Generator().manual_seed(seed)
    cfg = policy.config
    prompts = prompts or [f"pick up block {i}" for i in range(batch)]
    ids, mask = policy.backbone.tokenize(prompts, cfg.max_prompt_len)
    images = {c: torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) for c in cfg.cameras}
    masks = {c: torch.ones(batch, dtype=torch.bool) for c in cfg.cameras}
    state = torch.randn(batch, cfg.max_state_dim, generator=g)
    return Observation(images=images, image_masks=masks, state=state, prompt_ids=ids, prompt_mask=mask,
                       state_mask=torch.ones_like(state, dtype=torch.bool))
