"""Real-time chunking: a new flow-matching chunk that agrees with the actions already committed.

With asynchronous inference a chunk is computed while the previous one executes: by the time it
arrives, its first ``d`` actions (the inference delay) are already being executed from the old
chunk, and the overlap after them should continue the old plan smoothly rather than jump to a
different mode. Real-time chunking (RTC; Black, Galliker & Levine, 2025) treats this as inpainting:
at every Euler step of the flow sampler, the velocity is corrected so that the predicted clean
chunk moves toward the committed actions where they have weight (pseudo-inverse guidance, PiGDM):

    x0_hat = x_s - s * v(x_s)                              # our convention: s = 1 noise, s = 0 data
    v     <- v - c(s) * J^T [W * (Y - x0_hat)],  J = d x0_hat / d x_s   (one vector-Jacobian product)
    c(s)  =  min(beta, (1 - tau) / (tau * r^2)),  tau = 1 - s,  r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)

``W`` (``rtc_weights``) is 1 on the ``delay`` frozen steps, decays exponentially over the steps that
the old chunk still planned, and is 0 on the last ``execute`` steps (new territory). ``beta``
(``max_guidance``, 5 in the paper) caps the guidance at the noisy start. The cost is one backward
pass through the action expert per Euler step (the backbone prefix is not differentiated).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: `vla deploy --server` clients may run without it
    from torch import Tensor


@dataclass
class InpaintGuide:
    """What a new chunk should agree with, in the head's normalized action space.

    target: (B, H, A) committed actions (any value where ``weights`` is 0) ; weights: (B, H, A) in [0, 1].
    """

    target: Tensor
    weights: Tensor
    max_guidance: float = 5.0

    def check(self, batch: int, horizon: int, action_dim: int) -> None:
        import torch

        want = (batch, horizon, action_dim)
        for name in ("target", "weights"):
            t = getattr(self, name)
            if tuple(t.shape) != want:
                raise ValueError(f"inpaint {name}: expected shape (B, H, A) = {want}, received {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"inpaint {name}: has NaN/inf values")
        if bool(((self.weights < 0) | (self.weights > 1)).any()):
            raise ValueError("inpaint weights: expected values in [0, 1]")
        if not self.max_guidance > 0:
            raise ValueError(f"inpaint max_guidance: expected > 0, received {self.max_guidance}")

    def repeat(self, n: int) -> "InpaintGuide":
        """The same guide for N candidates per observation (candidate-major rows, like Prefix.repeat)."""
        return InpaintGuide(self.target.repeat_interleave(n, 0), self.weights.repeat_interleave(n, 0),
                            self.max_guidance)


def rtc_weights(horizon: int, delay: int, execute: int) -> np.ndarray:
    """(H,) RTC's soft mask: 1 for the first ``delay`` steps, exponential decay while the old chunk
    still has actions (up to ``horizon - execute``), 0 for the last ``execute`` steps."""
    if not 0 <= delay <= horizon:
        raise ValueError(f"rtc_weights: delay must be in [0, horizon={horizon}], received {delay}")
    if not 0 <= execute <= horizon - delay:
        raise ValueError(f"rtc_weights: execute must be in [0, horizon - delay = {horizon - delay}], received {execute}")
    w = np.zeros(horizon)
    w[:delay] = 1.0
    end = horizon - execute
    for i in range(delay, end):
        c = (end - i) / (end - delay + 1)
        w[i] = c * (math.exp(c) - 1) / (math.e - 1)
    return w


def guidance_scale(s: float, max_guidance: float) -> float:
    """c(s) of the module docstring; s is our noise level (1 = pure noise)."""
    tau = 1.0 - s
    if tau <= 0:
        return max_guidance
    r2 = s * s / (tau * tau + s * s)
    if r2 <= 0:
        return max_guidance
    return min(max_guidance, s / (tau * r2))


def guided_velocity(velocity, x: Tensor, s: float, guide: InpaintGuide) -> tuple[Tensor, Tensor]:
    """``velocity(x) -> (v, hidden)`` corrected toward ``guide``. x: (M, H, A) fp32 -> v (M, H, A) fp32, hidden."""
    import torch

    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v, hidden = velocity(xg)
        x0 = xg - s * v.float()
        err = (guide.target.to(x0) - x0.detach()) * guide.weights.to(x0)
        (g,) = torch.autograd.grad(x0, xg, grad_outputs=err)
    return v.detach().float() - guidance_scale(s, guide.max_guidance) * g, hidden.detach()
