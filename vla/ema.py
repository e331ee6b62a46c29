"""Exponential moving average (Polyak averaging) of a policy's trainable weights.

Diffusion Policy and openpi evaluate the EMA of the weights rather than the last iterate: the
average over the last ~1/(1 - decay) steps smooths out the noise of small-batch SGD on a few hundred
demonstrations, which matters for a closed-loop policy whose errors compound.

    ema = EMA(policy, decay=0.999)
    ...; opt.step(); ema.update(policy)
    with ema.swapped(policy):       # the policy holds the averaged weights inside the block
        policy.save_pretrained(path)

Only parameters with ``requires_grad`` are averaged (a frozen encoder is its own average); buffers
are left as they are. The shadow copy is fp32 whatever the parameters' dtype.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        # With warmup the effective decay is min(decay, (1 + n) / (10 + n)) after n updates, so early
        # averages are not dominated by the random initialisation (timm's ModelEmaV3, TF's num_updates).
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in self._params(model)}
        if not self.shadow:
            raise ValueError("ema: the model has no trainable parameters")

    @staticmethod
    def _params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in model.named_parameters() if p.requires_grad)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """shadow <- d * shadow + (1 - d) * weights; call once after each optimizer step."""
        d = self.current_decay()
        names, params = zip(*self._params(model))
        # One fused op over all tensors: this runs every optimizer step.
        torch._foreach_lerp_([self.shadow[n] for n in names], [p.detach().float() for p in params], 1.0 - d)
        self.num_updates += 1

    @contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Inside the block the model's trainable weights are the EMA; the training weights come back after."""
        params = dict(self._params(model))
        if set(params) != set(self.shadow):
            missing = sorted(set(self.shadow) ^ set(params))[:5]
            raise KeyError(f"ema: the model's trainable parameters differ from the averaged ones: {missing}")
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise KeyError("ema: the saved average was taken over different parameters "
                           f"({len(state['shadow'])} saved, {len(self.shadow)} trainable now)")
        self.decay, self.warmup, self.num_updates = state["decay"], state["warmup"], state["num_updates"]
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The current (non-averaged) trainable weights, for exact resumption of an EMA run."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for n, t in state.items():
        if n not in params:
            raise KeyError(f"ema resume: parameter {n!r} is not in the model")
        params[n].copy_(t)
