"""Chunk rewards for preference pairs (NORA-1.5): world-model goal progress, action deviation, a mix.

    gp  = goal_progress(wm, z, chunks, goal)                  # (B, N) higher = closer to the goal
    dev = action_deviation(chunks, data_chunk, is_pad, dims)  # (B, N) lower = closer to the data
    r   = combine({"goal_progress": gp, "action": -dev}, weights, scales)

Why scales: the components live in different units (latent distance vs normalized action units).
``within_scale`` measures each one's spread ACROSS THE CANDIDATES OF ONE OBSERVATION (what a
preference pair compares), so the weights mean "relative importance in units of that spread".
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

COMPONENTS = ("goal_progress", "action")


def goal_progress(wm, obs_or_latent, chunks: Tensor, goal=None) -> Tensor:
    """(B, N): distance to the goal latent before the chunk minus the predicted distance after it."""
    with torch.no_grad():
        return wm.reward(obs_or_latent, chunks, goal)


def action_deviation(chunks: Tensor, reference: Tensor, is_pad: Tensor | None = None,
                     dim_mask: Tensor | None = None) -> Tensor:
    """Mean over valid steps of the L2 distance (over valid dims) between each candidate and the data.

    chunks (B, N, H, A), reference (B, H, A), is_pad (B, H) bool, dim_mask (B, A) bool -> (B, N).
    """
    if chunks.ndim != 4 or reference.ndim != 3 or chunks.shape[0] != reference.shape[0] \
            or chunks.shape[2:] != reference.shape[1:]:
        raise ValueError(f"action_deviation: expected chunks (B, N, H, A) and reference (B, H, A), received "
                         f"{tuple(chunks.shape)} and {tuple(reference.shape)}")
    diff = chunks.float() - reference[:, None].float()
    if dim_mask is not None:
        diff = diff * dim_mask[:, None, None, :].to(diff.dtype)
    per_step = diff.pow(2).sum(-1).sqrt()  # (B, N, H)
    if is_pad is None:
        return per_step.mean(-1)
    valid = (~is_pad.bool())[:, None, :].to(per_step.dtype)
    return (per_step * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)


def within_scale(x: Tensor, eps: float = 1e-8) -> float:
    """Root-mean-square deviation from each observation's candidate mean: x (B, N) -> scalar."""
    return float((x - x.mean(1, keepdim=True)).pow(2).mean().sqrt().clamp(min=eps))


def combine(components: Mapping[str, Tensor], weights: Mapping[str, float],
            scales: Mapping[str, float] | None = None) -> Tensor:
    """Weighted sum of (B, N) components (each divided by its scale). Unknown names raise."""
    unknown = sorted(set(weights) - set(components))
    if unknown:
        raise KeyError(f"reward weights name components {unknown} that were not computed; have {sorted(components)}")
    total = None
    for name, w in weights.items():
        if w == 0:
            continue
        s = 1.0 if scales is None else float(scales[name])
        term = components[name] * (float(w) / s)
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"reward weights are all zero: {dict(weights)}")
    return total


def parse_weights(text: str) -> dict[str, float]:
    """"goal_progress=1,action=1" -> {"goal_progress": 1.0, "action": 1.0}; names checked."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = part.partition("=")
        if not sep or name not in COMPONENTS:
            raise ValueError(f"reward weights: expected NAME=FLOAT with NAME in {list(COMPONENTS)}, received {part!r}")
        try:
            out[name] = float(val)
        except ValueError:
            raise ValueError(f"reward weights: {name}={val!r} is not a number") from None
    if not out:
        raise ValueError(f"reward weights: none given (expected e.g. 'goal_progress=1,action=1'), received {text!r}")
    return out
