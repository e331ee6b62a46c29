"""Optimizer and learning-rate schedule (AdamW, linear warmup, cosine decay)."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and embeddings (1-D tensors and embedding
    tables); an optional lower learning rate for the backbone."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "embed" in name
        is_backbone = name.startswith("backbone.")
        groups.setdefault((is_backbone, no_decay), []).append(p)
    out = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        scale = backbone_lr_scale if is_backbone else 1.0
        out.append({"params": params, "lr": lr * scale, "lr_scale": scale,
                    "weight_decay": 0.0 if no_decay else weight_decay})
    return out


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LambdaLR factor: 0 -> 1 linearly over ``warmup`` steps, then cosine down to ``min_ratio``."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, warmup: int, total: int,
                   min_ratio: float, backbone_lr_scale: float = 1.0):
    opt = torch.optim.AdamW(param_groups(model, lr, weight_decay, backbone_lr_scale), lr=lr,
                            betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total, min_ratio))
    return opt, sched
