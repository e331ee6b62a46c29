"""Transformer building blocks shared by the tiny language model and the action experts.

A :class:`Block` is split into ``qkv`` (norm + projections + RoPE) and ``finish`` (output projection,
residuals, MLP) so that two different stacks — the backbone's language model and an action expert —
can share ONE attention operation per layer (pi0's mixture of transformers). The cached-prefix path
and the joint block-causal path therefore run exactly the same arithmetic.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class RopeTable(NamedTuple):
    """cos and sign-folded sin (B, 1, T, D) fp32 of :func:`rope` for fixed positions: computed once, reused by
    every layer (and by every Euler step of a flow head, whose action positions do not change).

    ``sin_folded`` is sin with its first half negated, so that rotate-half is a swap of the halves and the rotation is
    one fused multiply-add (``rope``): 3 elementwise kernels per call instead of 6."""

    cos: Tensor
    sin_folded: Tensor


def rope_table(positions: Tensor, head_dim: int, theta: float) -> RopeTable:
    """positions (B, T) -> the RoPE angles' cos / sign-folded sin, (B, 1, T, head_dim) each."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=positions.device, dtype=torch.float32) / d))
    ang = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    return RopeTable(torch.cat([ang.cos(), ang.cos()], dim=-1)[:, None],
                     torch.cat([-ang.sin(), ang.sin()], dim=-1)[:, None])


def rope(x: Tensor, positions: Tensor | RopeTable, theta: float) -> Tensor:
    """Rotary position embedding (rotate-half layout, as in Llama/Gemma).

    x: (B, heads, T, D) ; positions: (B, T) long, or a :class:`RopeTable` of them -> (B, heads, T, D)
    """
    d = x.shape[-1]
    table = positions if isinstance(positions, RopeTable) else rope_table(positions, d, theta)
    cos, sin = table.cos.to(x.dtype), table.sin_folded.to(x.dtype)
    # x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] and the sign folded into sin. Built
    # from the concatenation, so the result is contiguous (B, heads, T, D) even when x is a transposed
    # projection: the matmuls that read it (cascade attention) then need no copies.
    out = torch.cat([x[..., d // 2:], x[..., : d // 2]], dim=-1) * sin
    return out.addcmul_(x, cos)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Scaled dot-product attention with grouped KV heads.

    q: (B, H, Tq, D) ; k, v: (B, KV, Tk, D) ; mask: (B, Tq, Tk) bool, True = may attend.
    Every query row must allow at least one key (callers let padded queries see themselves).
    """
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])


def attend_shared_prefix(
    q: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_mask: Tensor | None, k: Tensor, v: Tensor,
    num_candidates: int, self_mask: Tensor | None = None,
) -> Tensor:
    """Attention of N candidates' tokens to ONE shared prefix and to their own tokens (cascade attention).

    The N candidates of an observation are laid end to end as one sequence of N*T tokens
    (candidate-major), so every product below is a plain batched matmul on free views — no permute
    copies. q: (B, H, N*T, D) ; prefix_k, prefix_v: (B, KV, P, D) ; prefix_mask: (B, P) bool or None
    (all visible) ; k, v: (B, KV, N*T, D) the candidates' own keys/values ; self_mask: (T, T) bool among
    one candidate's tokens or None (all visible) -> (B, H, N*T, D).

    Equal to ``attend`` over the prefix repeated N times, but the prefix's keys/values are neither
    copied nor concatenated: the N*T queries of an observation meet its P prefix keys in one matmul, a
    candidate meets only its own T keys (block-diagonal, one small matmul per candidate in one batch),
    and one softmax runs over [prefix scores, own scores].
    """
    b, h, nt, d = q.shape
    kvh, p, n = prefix_k.shape[1], prefix_k.shape[2], num_candidates
    t, g = nt // max(n, 1), h // kvh
    if n < 1 or nt != n * t or h != g * kvh or k.shape != v.shape or k.shape[2] != nt or prefix_v.shape != prefix_k.shape:
        raise ValueError(f"attend_shared_prefix: {nt} query tokens are not {n} candidates of equal length with "
                         f"{k.shape[2]} own keys (k {tuple(k.shape)}, v {tuple(v.shape)}, prefix k "
                         f"{tuple(prefix_k.shape)}, v {tuple(prefix_v.shape)}), or {h} heads not a multiple of {kvh}")
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in fp32 even for bf16 inputs (fp64 for fp64)
    q = q * d ** -0.5  # scaled once, on the smaller side of both score matmuls
    # Query head i uses kv head i // g (as repeat_interleave in `attend`): the g heads of a group, the N
    # candidates and the T tokens are the rows of one matrix per kv head — a free view of q.
    rows = q.reshape(b, kvh, g * nt, d)
    s_prefix = (rows @ prefix_k.transpose(-1, -2)).to(acc)  # (B, KV, G*N*T, P)
    if prefix_mask is not None:
        s_prefix = s_prefix.masked_fill(~prefix_mask[:, None, None, :], float("-inf"))
    blocks = q.reshape(b, kvh, g, n, t, d)
    s_self = (blocks @ k.reshape(b, kvh, 1, n, t, d).transpose(-1, -2)).to(acc)  # (B, KV, G, N, T, T)
    if self_mask is not None:
        s_self = s_self.masked_fill(~self_mask, float("-inf"))
    probs = torch.cat([s_prefix, s_self.reshape(b, kvh, g * nt, t)], dim=-1).softmax(-1).to(v.dtype)
    p_prefix, p_self = probs.split([p, t], dim=-1)
    out = p_prefix @ prefix_v  # (B, KV, G*N*T, D)
    out_self = p_self.reshape(b, kvh, g, n, t, t) @ v.reshape(b, kvh, 1, n, t, d)  # (B, KV, G, N, T, D)
    return (out.view(b, kvh, g, n, t, d) + out_self).view(b, h, nt, d)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block with RoPE and grouped-query attention.

    The attention geometry (heads, kv heads, head_dim) is independent of the residual ``width``, so a
    narrow action expert can attend to a wide backbone's keys and values.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        mlp_ratio: float = 4.0,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.norm1 = RMSNorm(width)
        self.q_proj = nn.Linear(width, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(width, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(width, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, width, bias=False)
        self.norm2 = RMSNorm(width)
        # 2/3 keeps SwiGLU's parameter count equal to a GELU MLP of ratio `mlp_ratio`.
        self.mlp = SwiGLU(width, int(mlp_ratio * width * 2 / 3))

    def qkv(self, x: Tensor, positions: Tensor | RopeTable) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, W), positions (B, T) or their :class:`RopeTable` -> q (B, H, T, D), k and v
        (B, KV, T, D), RoPE applied."""
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.q_proj(h).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """x: (B, T, W) residual input, attn: (B, H, T, D) attention output -> (B, T, W)."""
        b, _, t, _ = attn.shape
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.norm2(x))

    def forward(
        self,
        x: Tensor,
        positions: Tensor | RopeTable,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Self-attention over ``past`` keys/values (if any) followed by the new tokens.

        mask: (B, T, T_past + T) bool. Returns the new residual stream and the NEW tokens' (k, v).
        """
        q, k, v = self.qkv(x, positions)
        if past is not None:
            kk, vv = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        else:
            kk, vv = k, v
        return self.finish(x, attend(q, kk, vv, mask)), (k, v)


def sincos_embedding(t: Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Tensor:
    """Sine-cosine embedding of a scalar per row (pi0's time embedding). t: (B,) -> (B, dim)."""
    if dim % 2:
        raise ValueError(f"sincos_embedding: dim must be even, got {dim}")
    frac = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    ang = t.double()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1).to(torch.float32)


def sincos_2d(h: int, w: int, dim: int, device=None) -> Tensor:
    """Fixed 2-D sine-cosine position table for an (h, w) feature map -> (h*w, dim)."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be a multiple of 4, got {dim}")
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    omega = 1.0 / (10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4)))
    out = []
    for coord in (ys.flatten(), xs.flatten()):
        ang = coord[:, None] * omega[None]
        out += [ang.sin(), ang.cos()]
    return torch.cat(out, dim=-1)


def prefix_attention_mask(valid: Tensor) -> Tensor:
    """Bidirectional mask over valid tokens: (B, T) bool -> (B, T, T).

    A padded query attends only to itself, so no row is empty (an empty row makes SDPA return NaN);
    nothing ever attends TO a padded key.
    """
    t = valid.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)
    return (valid[:, None, :] & valid[:, :, None]) | eye
