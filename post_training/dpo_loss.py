"""DPO on action chunks: exact log-probabilities for token heads, Diffusion-DPO for flow heads.

    ref = frozen_reference(policy.head)                 # a frozen copy of the head, made once
    prefix = policy.encode(obs, dim_mask)               # ONE backbone pass, shared by both heads
    out = dpo_terms(policy.head, ref, policy.backbone, prefix, chosen, rejected, beta=...)
    out.loss.backward()

Exact (discrete / coarse-to-fine heads, whose ``loss`` is the per-step NLL): log pi(chunk) = -loss.sum(-1),
    L = -log sigmoid(beta * [(log pi(w) - log ref(w)) - (log pi(l) - log ref(l))]).
Flow heads (Diffusion-DPO, Wallace et al. 2023): the per-sample flow-matching error at one (noise, time)
stands in for -log pi (an ELBO term); with e = mean over valid steps of the head's (B, H) loss,
    L = -log sigmoid(-beta * [(e_pi(w) - e_ref(w)) - (e_pi(l) - e_ref(l))]),
and the chosen and the rejected chunk MUST see the same noise and time: otherwise the difference is
dominated by the corruption's randomness, not by the chunks (this is checked by a test: identical
chunks give identical errors only with shared corruption).

At initialization (policy == reference) the bracket is 0 and L = log 2 exactly.
The reference head reads the same (detached) prefix as the policy head ("sharing the backbone prefix"):
one backbone pass per observation, and with a frozen backbone or LoRA the reference is exact.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla.types import Prefix


def likelihood_kind(head: nn.Module) -> str:
    """"flow" when the head's loss takes a shared ``noise``/``time`` (a flow/diffusion ELBO surrogate),
    else "exact" (the loss is a per-step negative log-likelihood)."""
    params = inspect.signature(head.loss).parameters
    return "flow" if "noise" in params and "time" in params and hasattr(head, "sample_time") else "exact"


def frozen_reference(head: nn.Module) -> nn.Module:
    """A frozen deep copy of the head (eval mode, no gradients)."""
    ref = copy.deepcopy(head)
    ref.requires_grad_(False)
    return ref.eval()


@dataclass
class DPOOutput:
    loss: Tensor  # scalar: mean DPO loss (+ sft_weight * chosen loss)
    logits: Tensor  # (B,) beta * implicit reward margin; > 0 means the pair is ranked right
    chosen_ratio: Tensor  # (B,) log pi/ref of the chosen chunk (flow: -(e_pi - e_ref))
    rejected_ratio: Tensor  # (B,)
    sft: Tensor  # scalar: the policy's mean loss on the chosen chunks

    def metrics(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), "accuracy": float((self.logits > 0).float().mean()),
                "margin": float(self.logits.detach().mean()),
                "chosen_ratio": float(self.chosen_ratio.detach().mean()),
                "rejected_ratio": float(self.rejected_ratio.detach().mean()), "sft": float(self.sft.detach())}


def _per_sample(step_loss: Tensor, is_pad: Tensor, kind: str) -> Tensor:
    """(B, H) head loss -> (B,) score s with s = -log pi (exact) or the mean flow error (flow)."""
    if kind == "exact":
        return step_loss.sum(-1)
    valid = (~is_pad.bool()).to(step_loss.dtype)
    return (step_loss * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)


def pair_losses(head: nn.Module, backbone, prefix: Prefix, chosen: Tensor, rejected: Tensor, is_pad: Tensor,
                kind: str, noise: Tensor | None = None, time: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B,) per-sample scores (-log-likelihood surrogate) of the chosen and the rejected chunks.

    Both chunks go through ONE head call on a 2B batch (prefix rows interleaved: [w_0, l_0, w_1, l_1, ...]);
    for a flow head both rows of a pair get the same ``noise`` (B, H, A) and ``time`` (B,).
    """
    b = chosen.shape[0]
    both = torch.stack([chosen, rejected], 1).flatten(0, 1)  # (2B, H, A)
    pad2 = is_pad.repeat_interleave(2, 0)
    kw = {}
    if kind == "flow":
        kw["noise"] = noise.repeat_interleave(2, 0)
        kw["time"] = time.repeat_interleave(2, 0)
    step = head.loss(backbone, prefix.repeat(2), both, pad2, **kw)  # (2B, H)
    s = _per_sample(step, pad2, kind).view(b, 2)
    return s[:, 0], s[:, 1]


def dpo_objective(pw: Tensor, pl: Tensor, rw: Tensor, rl: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Per-pair DPO loss (B,) and logits (B,) from -log-likelihood (surrogate) scores of the policy (pw, pl)
    and the reference (rw, rl): log pi/ref = ref - pi. Lowering pw (chosen more likely) lowers the loss."""
    logits = beta * ((rw - pw) - (rl - pl))
    return -F.logsigmoid(logits), logits


def dpo_terms(head: nn.Module, ref_head: nn.Module, backbone, prefix: Prefix, chosen: Tensor, rejected: Tensor,
              *, beta: float, is_pad: Tensor | None = None, sft_weight: float = 0.0,
              generator: torch.Generator | None = None, kind: str | None = None) -> DPOOutput:
    """DPO loss for a batch of pairs. chosen / rejected (B, H, A) normalized chunks; is_pad (B, H)."""
    if chosen.shape != rejected.shape or chosen.ndim != 3:
        raise ValueError(f"dpo: chosen and rejected must both be (B, H, A), received {tuple(chosen.shape)} "
                         f"and {tuple(rejected.shape)}")
    if not beta > 0:
        raise ValueError(f"dpo: beta must be > 0, received {beta}")
    kind = kind or likelihood_kind(head)
    b = chosen.shape[0]
    if is_pad is None:
        is_pad = torch.zeros(chosen.shape[:2], dtype=torch.bool, device=chosen.device)
    noise = time = None
    if kind == "flow":
        dev = chosen.device
        noise = torch.randn(chosen.shape, generator=generator, device="cpu" if generator is not None else dev).to(dev)
        time = head.sample_time(b, dev, generator=generator)
    pw, pl = pair_losses(head, backbone, prefix, chosen, rejected, is_pad, kind, noise, time)
    with torch.no_grad():
        rw, rl = pair_losses(ref_head, backbone, prefix.detach(), chosen, rejected, is_pad, kind, noise, time)
    # Log-ratios log pi/ref; for both kinds the score is a -log-likelihood (surrogate), so ratio = ref - pi.
    chosen_ratio, rejected_ratio = rw - pw, rl - pl
    per_pair, logits = dpo_objective(pw, pl, rw, rl, beta)
    loss = per_pair.mean()
    sft = pw.mean()
    if sft_weight:
        loss = loss + sft_weight * sft
    return DPOOutput(loss=loss, logits=logits.detach(), chosen_ratio=chosen_ratio.detach(),
                     rejected_ratio=rejected_ratio.detach(), sft=sft.detach())
