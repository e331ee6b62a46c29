"""Discrete action-token head: the backbone's language model predicts action codes (OpenVLA, pi0-FAST).

The suffix after the prefix is ``[state, c_0, c_1, ..., c_{L-2}]``: the token at index i predicts code
``c_i`` (the state token predicts the first code). Codes come from an action tokenizer fitted on the
dataset (``--head.tokenizer.type=uniform|adaptive_grid|fast``) and get their own embedding table and
output projection; a learned slot embedding tells each token which code position it fills (RoPE
positions start after a prompt of varying length, so relative position alone would not say it).

Two decoders (``--head.decoding``):

* ``autoregressive``: one token per forward pass, each pass reading the prefix KV cache plus the
  keys/values of the codes generated so far (``Backbone.extend(..., return_prefix=True)``). The state
  token is run once per observation; its cache is then repeated for the N candidates.
* ``parallel`` (OpenVLA-OFT style): L learned query tokens attend to the prefix, the state and each
  other (bidirectional) and predict every code in ONE pass. The pass does not depend on the sampled
  codes, so N candidates cost one pass on B rows and N draws from the same distributions.

Variable-length tokenizers (FAST) append an end-of-sequence id; they need ``autoregressive``.
A FAST row decodes only if its BPE tokens spell exactly ``H * A`` DCT coefficients, which a model
that is not fully trained often misses (pi0-FAST's release returns zeros then). Decoding is therefore
constrained (``--head.constrain_length``, on by default): at each position only ids that fit in the
coefficients still missing are allowed, and EOS only when none are missing — renormalizing the
model's distribution over the sequences that decode, so every sampled row is a chunk.
Rows that still do not decode are re-sampled up to ``max_resample`` times (at ``resample_temperature``
when the first draw was greedy, since a greedy re-draw repeats itself); if still invalid, sampling
raises instead of returning NaN or zeros.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from action_tokenizers.base import TokenizerConfig
from policies.token_head import TokenHead, check_decoding
from vla.backbones.base import Backbone
from vla.config import HeadConfig, PolicyConfig
from vla.types import Prefix

DECODINGS = ("autoregressive", "parallel")


@HeadConfig.register_subclass("discrete")
@dataclass
class DiscreteConfig(HeadConfig):
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig.get_choice_class("uniform")())
    tokenizer_path: str | None = None  # a tokenizer saved by `vla tokenizer fit` (else fitted at train start)
    decoding: str = "autoregressive"  # or "parallel"
    temperature: float = 1.0  # 0 = greedy (then N candidates are identical)
    top_k: int = 0  # 0 = the whole vocabulary
    max_resample: int = 3  # tries for rows that sampled an undecodable code sequence
    resample_temperature: float = 1.0  # re-draws after a greedy (temperature 0) draw use this
    constrain_length: bool = True  # variable-length tokenizers: only sample rows of the decodable length
    # What temperature 0 decodes: "argmax" (each position's most likely code) or "expected" (each position's
    # expected value under the predicted distribution, e.g. between two bins; per-position tokenizers only).
    greedy: str = "argmax"
    # With temperature > 0: candidate 0 of each observation is the argmax decode, the others draws (the
    # greedy chunk is always among the N; see CoarseToFineConfig.greedy_first).
    greedy_first: bool = False

    @classmethod
    def tiny(cls) -> "DiscreteConfig":
        return cls(tokenizer=TokenizerConfig.get_choice_class("uniform")(n_bins=16))

    def build(self, backbone: Backbone, policy: PolicyConfig) -> "DiscreteHead":
        return DiscreteHead(self, backbone, policy.chunk_size, policy.max_action_dim, policy.max_state_dim)


class DiscreteHead(TokenHead):
    def __init__(self, cfg: DiscreteConfig, backbone: Backbone, chunk_size: int, action_dim: int, state_dim: int):
        if cfg.decoding not in DECODINGS:
            raise ValueError(f"head.decoding: expected one of {DECODINGS}, got {cfg.decoding!r}")
        super().__init__(cfg.tokenizer, cfg.tokenizer_path, chunk_size, action_dim, state_dim, backbone.hidden_size)
        self.cfg = cfg
        self.variable = not self.tokenizer.fixed_length
        check_decoding(cfg, self.tokenizer, per_position=True)
        if self.variable and cfg.decoding == "parallel":
            raise ValueError(f"head.decoding='parallel' needs a fixed-length tokenizer; {cfg.tokenizer.type!r} "
                             "codes vary in length: use decoding='autoregressive'")
        self.eos = self.vocab  # only used by variable-length tokenizers
        n_out = self.vocab + int(self.variable)
        d = backbone.hidden_size
        self.code_emb = nn.Embedding(n_out, d)
        self.slot_emb = nn.Embedding(self.max_codes + 1 + int(self.variable), d)
        self.code_out = nn.Linear(d, n_out)
        nn.init.normal_(self.code_emb.weight, std=d ** -0.5)
        nn.init.normal_(self.slot_emb.weight, std=d ** -0.5)

    def refit_tokenizer(self, chunks) -> None:
        """Fine-tuning on a new dataset: re-fit the tokenizer and move each learned code embedding (and
        output row) to where its bin went — SpatialVLA's re-discretization. Needs a tokenizer with
        ``refit(new_actions, old_embeddings)`` (the adaptive grid)."""
        tok = self._require_tokenizer()
        if not hasattr(tok, "refit"):
            raise ValueError(f"refit_tokenizer: the {tok.config.type!r} tokenizer cannot carry embeddings over; "
                             "only adaptive_grid can (or train a fresh head)")
        v = tok.vocab_size
        with torch.no_grad():
            table = torch.cat([self.code_emb.weight[:v], self.code_out.weight[:v], self.code_out.bias[:v, None]], 1)
            new = tok.refit(chunks, table)  # one re-fit, every per-token row interpolated the same way
            d = self.code_emb.weight.shape[1]
            self.code_emb.weight[:v] = new[:, :d]
            self.code_out.weight[:v] = new[:, d:2 * d]
            self.code_out.bias[:v] = new[:, -1]

    # --- training -----------------------------------------------------------------------------
    def targets(self, actions: Tensor, prefix: Prefix) -> tuple[Tensor, Tensor]:
        """Codes (B, L) and mask (B, L); variable-length rows get EOS after their last code."""
        codes, mask = self.encode_actions(actions, prefix.extras.get("action_dim_mask"))
        if not self.variable:
            return codes, mask
        b = codes.shape[0]
        codes = torch.cat([codes, codes.new_zeros(b, 1)], 1)
        mask = torch.cat([mask, mask.new_zeros(b, 1)], 1)
        lengths = mask.sum(1)
        codes[torch.arange(b), lengths] = self.eos
        mask[torch.arange(b), lengths] = True
        return codes, mask

    def logits(self, backbone: Backbone, prefix: Prefix, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: codes (B, L) -> logits (B, L, V_out) and the hidden states that made them."""
        b, n_codes = codes.shape
        slots = self.slot_emb.weight[: n_codes + 1]
        first = self.state_token(prefix) + slots[0]
        if self.cfg.decoding == "parallel":
            queries = slots[1:][None].expand(b, -1, -1)
            x = torch.cat([first, queries], 1)
            full = torch.ones(n_codes + 1, n_codes + 1, dtype=torch.bool, device=x.device)
            h = backbone.extend(x, prefix, full)[:, 1:]
        else:
            x = torch.cat([first, self.code_emb(codes[:, :-1]) + slots[1:n_codes]], 1)
            h = backbone.extend(x, prefix)  # causal among the new tokens
        return self.code_out(h), h

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, backbone: Backbone, prefix: Prefix, num_samples: int = 1,
               generator: torch.Generator | None = None, return_features: bool = False,
               temperature: float | None = None, top_k: int | None = None):
        """(B, N, H, A) chunks; with ``return_features`` also (B, N, L, hidden) hidden states that
        produced the codes (the chunk's representation for test-time selectors)."""
        temp = self.cfg.temperature if temperature is None else temperature
        k = self.cfg.top_k if top_k is None else top_k
        b, n = prefix.batch_size, num_samples
        expected = temp == 0 and self.cfg.greedy == "expected"
        codes, mask, feats, logits = self._sample_codes(backbone, prefix, n, temp, k, generator, keep_logits=expected,
                                                        greedy_first=self.cfg.greedy_first)
        if expected:  # per-position values: every row decodes
            chunks = self.expected_chunks(logits)
            valid = torch.ones(len(chunks), dtype=torch.bool, device=chunks.device)
        else:
            chunks, valid = self.decode_codes(codes, mask)
        retry_temp = temp if temp > 0 else self.cfg.resample_temperature
        for _ in range(self.cfg.max_resample):
            bad = (~valid).nonzero().flatten()
            if len(bad) == 0:
                break
            sub = prefix._map(lambda t: t[torch.div(bad, n, rounding_mode="floor")])
            c2, m2, f2, _ = self._sample_codes(backbone, sub, 1, retry_temp, k, generator)
            a2, v2 = self.decode_codes(c2, m2)
            chunks[bad], valid[bad] = a2, v2
            width = min(f2.shape[1], feats.shape[1])
            feats[bad] = 0
            feats[bad, :width] = f2[:, :width]
        if not bool(valid.all()):
            raise RuntimeError(f"discrete head: {int((~valid).sum())} of {b * n} sampled code sequences do not decode "
                               f"to a chunk after {self.cfg.max_resample} re-samples (tokenizer "
                               f"{self.tokenizer.config.type!r}); lower the temperature or use top_k")
        chunks = chunks.view(b, n, self.chunk_size, self.action_dim)
        if return_features:
            return chunks, feats.view(b, n, feats.shape[1], -1)
        return chunks

    def allowed_ids(self, device) -> Tensor:
        """(L, V_out) bool: what sampling may pick at each code slot (decodable ids; EOS rules)."""
        tok = self._require_tokenizer()
        length = tok.horizon * tok.tokens_per_step if tok.fixed_length else self.max_codes + 1
        allowed = self.logit_mask(length, self.code_out.out_features, device)
        if self.variable:
            allowed[-1, :] = False  # the last slot can only end the sequence
            allowed[-1, self.eos] = True
        return allowed

    def _length_constraint(self, rows: int, device) -> "_LengthBudget | None":
        """The per-row budget that keeps variable-length sampling decodable (None when not needed)."""
        if not (self.variable and self.cfg.constrain_length):
            return None
        constraint = self._require_tokenizer().length_constraint()
        if constraint is None:
            return None
        lengths, total = constraint
        return _LengthBudget(torch.from_numpy(lengths), total, self.code_out.out_features, self.eos, rows, device)

    def _sample_codes(self, backbone, prefix, n, temp, top_k, generator, keep_logits: bool = False,
                      greedy_first: bool = False):
        """-> codes (B*n, L), mask (B*n, L), features (B*n, L, hidden), and with ``keep_logits`` the masked
        logits (B*n, L, V_out) the codes were picked from (else None). ``greedy_first``: row 0 of each
        observation's n takes the argmax (re-draws pass False: a greedy re-draw would repeat itself)."""
        every = n if greedy_first else 0
        dev = prefix.hidden.device
        allowed = self.allowed_ids(dev)
        length = allowed.shape[0]
        if self.cfg.decoding == "parallel":
            dummy = torch.zeros(prefix.batch_size, length, dtype=torch.long, device=dev)
            logits, h = self.logits(backbone, prefix, dummy)  # ONE pass on B rows; codes are not read
            logits = logits.masked_fill(~allowed, float("-inf")).repeat_interleave(n, 0)
            codes = self.pick(logits, temp, top_k, generator, every)
            return codes, torch.ones_like(codes, dtype=torch.bool), h.repeat_interleave(n, 0), \
                logits if keep_logits else None
        slots = self.slot_emb.weight
        h, ctx = backbone.extend(self.state_token(prefix) + slots[0], prefix, return_prefix=True)
        ctx = ctx.repeat(n)  # the state token's keys/values are shared by the n candidates
        h = h[:, -1].repeat_interleave(n, 0)
        codes, feats, kept = [], [], []
        done = torch.zeros(h.shape[0], dtype=torch.bool, device=dev)
        fits = self._length_constraint(h.shape[0], dev)
        for i in range(length):
            ok = allowed[i] if fits is None else allowed[i] & fits()
            logits = self.code_out(h).masked_fill(~ok, float("-inf"))
            c = self.pick(logits, temp, top_k, generator, every)
            if keep_logits:
                kept.append(logits)
            if self.variable:
                c = torch.where(done, torch.full_like(c, self.eos), c)
                done = done | (c == self.eos)
            codes.append(c)
            feats.append(h)
            if fits is not None:
                fits.consume(c)
            if i == length - 1 or (self.variable and bool(done.all())):
                break
            x = (self.code_emb(c) + slots[i + 1])[:, None]
            h, ctx = backbone.extend(x, ctx, return_prefix=True)
            h = h[:, -1]
        codes_t, feats_t = torch.stack(codes, 1), torch.stack(feats, 1)
        logits_t = torch.stack(kept, 1) if keep_logits else None
        if not self.variable:
            return codes_t, torch.ones_like(codes_t, dtype=torch.bool), feats_t, logits_t
        mask = (codes_t != self.eos).cumprod(1).bool()  # codes before the first EOS
        ended = (codes_t == self.eos).any(1)
        mask = mask & ended[:, None]  # a row that never ended decodes as invalid (empty)
        return torch.where(mask, codes_t, 0), mask, feats_t, logits_t


class _LengthBudget:
    """Constrained decoding for tokenizers whose ids stand for a varying number of units (FAST's BPE
    tokens: characters = DCT coefficients) and whose rows decode only at an exact total.

    Each row keeps how many units are still missing. An id is allowed while it fits in that budget;
    EOS only once it is spent (and then only EOS). Every unit-length id is in the vocabulary (FAST's BPE
    starts from its whole alphabet) and the head allows ``H * A`` codes, so a row can always finish.
    """

    def __init__(self, lengths: Tensor, total: int, width: int, eos: int, rows: int, device):
        self.lengths = torch.full((width,), total + 1, dtype=torch.long)  # unused columns never fit
        self.lengths[: len(lengths)] = lengths
        self.lengths = self.lengths.to(device)
        self.eos = eos
        self.left = torch.full((rows,), total, dtype=torch.long, device=device)

    def __call__(self) -> Tensor:
        """(rows, width) bool: the ids each row may sample next."""
        ok = self.lengths[None] <= self.left[:, None]
        ok[:, self.eos] = self.left == 0
        return ok

    def consume(self, ids: Tensor) -> None:
        """Spend the budget of the ids just sampled (EOS costs nothing)."""
        self.left = self.left - self.lengths[ids].masked_fill(ids == self.eos, 0)
