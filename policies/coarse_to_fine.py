"""Coarse-to-fine autoregressive head (CARP): next-SCALE prediction over multi-scale VQ codes.

The ``msvq`` tokenizer describes a chunk with codes at scales (1, 2, 3, 4): one code for the whole
chunk, then 2, 3, 4 codes that correct what the coarser scales missed. This head predicts a whole
scale per forward pass instead of one token per pass:

    suffix tokens:  [state] [scale-0 slots] [scale-1 slots] ... [scale-(K-1) slots]
    scale k input:  the reconstruction from scales < k, resized to s_k latent steps (VAR / CARP),
                    projected to the LM width, plus a learned slot embedding
    attention:      block-causal by scale: a token sees the prefix, the state, every coarser scale and
                    its own scale (bidirectional inside a scale), never a finer one

Training runs all scales in ONE pass under that mask, with each scale's input built from the true
coarser codes (teacher forcing); the loss is the cross-entropy of every code. Sampling runs K passes
(K = number of scales, 4 by default), each extending the KV cache by one scale; the state and scale-0
tokens do not depend on sampled codes, so that first pass runs once per observation and its cache is
repeated for the N candidates. The finest reconstruction goes through the tokenizer's decoder.

With ``--head.tokenizer.per_dimension=true`` (CARP's layout) scale k has s_k * A tokens, one per latent
position and action dimension; each token's slot embedding is its position's plus its dimension's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from action_tokenizers.base import TokenizerConfig
from action_tokenizers.msvq import MSVQConfig
from policies.token_head import TokenHead, check_decoding
from vla.backbones.base import Backbone
from vla.config import HeadConfig, PolicyConfig
from vla.types import Prefix


@HeadConfig.register_subclass("coarse_to_fine")
@dataclass
class CoarseToFineConfig(HeadConfig):
    # Typed as the registry base so configs round-trip through draccus; only "msvq" is accepted.
    # Scales 1-2-4-8 (finest = one latent per step of an 8-step chunk) and a longer fit: on MetaWorld
    # MT10 chunks this halves the reconstruction error of the 1-2-3-4 / 400-step default (max |err|
    # 0.76 vs 2.04 in normalized units, rmse 0.055 vs 0.122), at 15 codes per chunk instead of 10.
    tokenizer: TokenizerConfig = field(default_factory=lambda: MSVQConfig(scales=[1, 2, 4, 8], steps=1500))
    tokenizer_path: str | None = None  # an msvq tokenizer saved by `vla tokenizer fit` (else fitted at train start)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0
    # What temperature 0 decodes: "argmax" (each slot's most likely code) or "expected" (each scale adds the
    # probability-weighted mean of the codebook vectors; the next scale reads that reconstruction).
    greedy: str = "argmax"
    # With temperature > 0: candidate 0 of each observation is the argmax decode and the others are draws, so
    # the N candidates always hold the greedy chunk (N=1 is then the greedy policy) and a selector that keeps
    # candidate 0 (``first``, a gate switched off) executes exactly what the greedy policy would.
    greedy_first: bool = False
    # Training only: the probability that a code of a coarser scale is replaced, in the inputs of the finer
    # scales, by a near-miss code, the finer targets then correcting it (``MSVQTokenizer.noisy_codes``). Teacher
    # forcing alone never shows a scale a wrong coarser reconstruction, which greedy decoding then feeds it.
    code_noise: float = 0.0
    # Training only: how the codes' cross-entropies are weighed. "token": every code alike (the exact sequence NLL;
    # the finest scale, with most codes, dominates: 32 of 60 per-dimension codes at 1-2-4-8). "scale": each scale
    # alike (weights sum to the number of codes), so the few coarse codes that move the whole chunk, and that greedy
    # decoding feeds to every finer scale, get the weight of the many fine corrections.
    scale_loss: str = "token"

    @classmethod
    def tiny(cls) -> "CoarseToFineConfig":
        return cls(tokenizer=MSVQConfig.tiny())

    def build(self, backbone: Backbone, policy: PolicyConfig) -> "CoarseToFineHead":
        return CoarseToFineHead(self, backbone, policy.chunk_size, policy.max_action_dim, policy.max_state_dim)


SCALE_LOSSES = ("token", "scale")


def scale_groups(scales: list[int]) -> Tensor:
    """(1 + L,) group id of each suffix token: 0 for the state, k + 1 for the tokens of scale k."""
    return torch.cat([torch.zeros(1, dtype=torch.long)] +
                     [torch.full((s,), k + 1, dtype=torch.long) for k, s in enumerate(scales)])


def block_causal_mask(scales: list[int]) -> Tensor:
    """(1 + L, 1 + L) bool, True = may attend: a token sees its own and every coarser group."""
    g = scale_groups(scales)
    return g[None, :] <= g[:, None]


class CoarseToFineHead(TokenHead):
    def __init__(self, cfg: CoarseToFineConfig, backbone: Backbone, chunk_size: int, action_dim: int, state_dim: int):
        if not isinstance(cfg.tokenizer, MSVQConfig):
            raise ValueError(f"head.tokenizer.type: coarse_to_fine predicts multi-scale codes and needs 'msvq', "
                             f"got {cfg.tokenizer.type!r}")
        super().__init__(cfg.tokenizer, cfg.tokenizer_path, chunk_size, action_dim, state_dim, backbone.hidden_size)
        self.cfg = cfg
        check_decoding(cfg, self.tokenizer, per_position=False)
        if not 0 <= cfg.code_noise < 1:
            raise ValueError(f"head.code_noise: expected 0 <= code_noise < 1, received {cfg.code_noise!r}")
        if cfg.scale_loss not in SCALE_LOSSES:
            raise ValueError(f"head.scale_loss: expected one of {SCALE_LOSSES}, received {cfg.scale_loss!r}")
        self.scales = list(cfg.tokenizer.scales)
        d = backbone.hidden_size
        self.latent_in = nn.Linear(cfg.tokenizer.latent_dim, d)
        self.slot_emb = nn.Embedding(sum(self.scales), d)  # one per latent position of each scale
        # per_dimension: the codes of one position differ by action dimension; sized for max_action_dim since
        # the fitted A is known only after the tokenizer is (tables are sized from the config, see token_head)
        self.dim_emb = nn.Embedding(action_dim, d) if cfg.tokenizer.per_dimension else None
        self.code_out = nn.Linear(d, self.vocab)
        nn.init.normal_(self.slot_emb.weight, std=d ** -0.5)
        if self.dim_emb is not None:
            nn.init.normal_(self.dim_emb.weight, std=d ** -0.5)
        self._layout: dict = {}  # device -> (scale sizes, mask, slot ids, dim ids) of the fitted tokenizer

    def fit_tokenizer(self, chunks) -> None:
        super().fit_tokenizer(chunks)
        self._check_tokenizer()

    def load_assets(self, path) -> None:
        super().load_assets(path)
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        """A pre-fitted tokenizer (``tokenizer_path``, a checkpoint's) must have the scales and layout the
        slot / dimension tables were built for, else tokens would silently get the wrong embeddings."""
        self._layout = {}
        tok, want = self.tokenizer.config, self.cfg.tokenizer
        if list(tok.scales) != self.scales or bool(tok.per_dimension) != bool(want.per_dimension):
            raise ValueError(f"coarse_to_fine: the fitted msvq tokenizer has scales={list(tok.scales)}, "
                             f"per_dimension={tok.per_dimension}; the head was built for scales={self.scales}, "
                             f"per_dimension={want.per_dimension} (head.tokenizer.*)")

    def layout(self, device: torch.device | str = "cpu") -> tuple[list[int], Tensor, Tensor, Tensor]:
        """Of the fitted tokenizer, on ``device``: codes per scale, the (1 + L, 1 + L) block-causal mask, and
        each code token's position slot and dimension ids (L,). Built once per device."""
        tok = self._require_tokenizer()
        sizes = tok.scale_sizes()
        device = torch.device(device)
        cached = self._layout.get(device)
        if cached is None or cached[0] != sizes:
            g = tok.groups
            starts = [sum(self.scales[:k]) for k in range(len(self.scales))]
            slot = torch.cat([torch.arange(st, st + s).repeat_interleave(g) for st, s in zip(starts, self.scales)])
            dim = torch.cat([torch.arange(g).repeat(s) for s in self.scales])
            cached = (sizes, block_causal_mask(sizes).to(device), slot.to(device), dim.to(device))
            self._layout[device] = cached
        return cached

    def _tokens(self, latents: Tensor, start: int) -> Tensor:
        """Scale inputs (M, s, D) (double, from the tokenizer) for code tokens ``start:start + s`` ->
        (M, s, hidden) suffix tokens."""
        w = self.latent_in.weight
        _, _, slot, dim = self.layout(w.device)
        end = start + latents.shape[1]
        emb = self.slot_emb.weight[slot[start:end]]
        if self.dim_emb is not None:
            emb = emb + self.dim_emb.weight[dim[start:end]]
        return self.latent_in(latents.to(device=w.device, dtype=w.dtype)) + emb

    # --- training -----------------------------------------------------------------------------
    def logits(self, backbone: Backbone, prefix: Prefix, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing, all scales in one pass: codes (B, L) -> logits (B, L, K_codebook), hidden (B, L, d)."""
        inputs = self._require_tokenizer().teacher_inputs(codes.cpu())  # (B, L, D)
        x = torch.cat([self.state_token(prefix), self._tokens(inputs, 0)], 1)
        h = backbone.extend(x, prefix, self.layout(x.device)[1])[:, 1:]
        return self.code_out(h), h

    def training_codes(self, actions: Tensor, prefix: Prefix) -> tuple[Tensor, Tensor, Tensor]:
        """In train mode with ``code_noise`` > 0 the finer scales read near-miss coarser codes and learn to
        correct them (the loss is then no longer the clean chunk's exact NLL); else teacher forcing."""
        if not (self.training and self.cfg.code_noise > 0):
            return super().training_codes(actions, prefix)
        tok = self.check_action_dims(prefix.extras.get("action_dim_mask"))
        used, target = tok.noisy_codes(actions[..., : tok.action_dim], self.cfg.code_noise)
        used, target = used.to(actions.device), target.to(actions.device)
        return used, target, torch.ones_like(target, dtype=torch.bool)

    def code_weights(self, length: int, device: torch.device | str) -> Tensor | None:
        """(L,) weights of the codes' cross-entropies in the train-mode loss, or None (every code 1: eval mode,
        ``scale_loss="token"``). "scale": a code of scale k weighs L / (K * codes of scale k)."""
        if not (self.training and self.cfg.scale_loss == "scale"):
            return None
        sizes = self.layout(device)[0]
        if sum(sizes) != length:
            raise ValueError(f"coarse_to_fine: {length} codes, the tokenizer's scales have {sum(sizes)}")
        return torch.cat([torch.full((s,), length / (len(sizes) * s)) for s in sizes]).to(device)

    # --- sampling: one forward pass per scale -------------------------------------------------
    @torch.no_grad()
    def sample(self, backbone: Backbone, prefix: Prefix, num_samples: int = 1,
               generator: torch.Generator | None = None, return_features: bool = False,
               temperature: float | None = None, top_k: int | None = None):
        """(B, N, H, A) chunks; with ``return_features`` also the code tokens' hidden states (B, N, L, d)."""
        tok = self._require_tokenizer()
        temp = self.cfg.temperature if temperature is None else temperature
        k_top = self.cfg.top_k if top_k is None else top_k
        b, n = prefix.batch_size, num_samples
        usable = self.logit_mask(1, self.vocab, prefix.hidden.device)[0]
        expected = temp == 0 and self.cfg.greedy == "expected"

        # Pass 1 (B rows): the state token and scale 0's slots, which read no sampled code.
        sizes, mask, _, _ = self.layout(prefix.hidden.device)
        s0 = sizes[0]
        x = torch.cat([self.state_token(prefix), self._tokens(tok.scale_input(tok.empty_latent(b), 0), 0)], 1)
        h, ctx = backbone.extend(x, prefix, mask[: 1 + s0, : 1 + s0], return_prefix=True)
        h = h[:, 1:].repeat_interleave(n, 0)
        ctx = ctx.repeat(n)
        f_hat = tok.empty_latent(b * n)
        codes, feats, start = [], [], 0
        for k, s in enumerate(sizes):
            if k > 0:  # passes 2..K: scale k's tokens, built from the reconstruction so far
                full = torch.ones(s, s, dtype=torch.bool, device=h.device)
                h, ctx = backbone.extend(self._tokens(tok.scale_input(f_hat, k), start), ctx, full, return_prefix=True)
            logits = self.code_out(h).masked_fill(~usable, float("-inf"))
            c = self.pick(logits, temp, k_top, generator, n if self.cfg.greedy_first else 0)  # (B*N, s)
            if expected:  # the mean codebook vector under the predicted distribution, not the argmax's
                f_hat = tok.add_expected_scale(f_hat, logits[..., : tok.vocab_size].double().softmax(-1))
            else:
                f_hat = tok.add_scale(f_hat, c)
            codes.append(c)
            feats.append(h)
            start += s
        if expected:
            chunks = torch.zeros(b * n, self.chunk_size, self.action_dim, device=h.device)
            chunks[..., : tok.action_dim] = tok.decode_latent(f_hat).float().to(h.device)
            valid = torch.isfinite(chunks).flatten(1).all(1)
        else:
            chunks, valid = self.decode_codes(torch.cat(codes, 1))
        if not bool(valid.all()):  # cannot happen with in-range codes; never hand NaN onwards
            raise RuntimeError(f"coarse_to_fine: {int((~valid).sum())} sampled code rows do not decode")
        chunks = chunks.view(b, n, self.chunk_size, self.action_dim)
        if return_features:
            return chunks, torch.cat(feats, 1).view(b, n, sum(sizes), -1)
        return chunks
