"""What the token heads (``discrete``, ``coarse_to_fine``) share: an action tokenizer fitted on the
dataset, code embeddings in the backbone's width, sampling with temperature / top-k, and the mapping
of a token sequence's negative log-likelihood onto the contract's per-step loss.

Token heads continue the backbone's language model over the prefix (``Backbone.extend``): the
new tokens are a state token followed by action-code tokens, with their own embedding table and
output projection (the VLM's text vocabulary is left alone).

Tables are sized from the tokenizer *config* (an upper bound such as ``n_bins * max_action_dim``),
not from the fitted tokenizer, so a checkpoint can be rebuilt before its fitted tokenizer is loaded;
ids the fitted tokenizer does not use are masked out of the logits when sampling.

Per-step loss: the contract asks for a (B, H) unreduced loss. When a tokenizer's codes belong to one
time step each (uniform bins, adaptive grid: ``t * A + a`` layouts), a step's loss is the NLL of its
own codes. When codes describe the whole chunk (FAST, multi-scale VQ), the sequence NLL is spread
evenly over the chunk's valid steps. Either way ``loss.sum(-1)`` is the exact negative
log-likelihood of the chunk's code sequence, which is what discrete DPO needs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from action_tokenizers.base import ActionTokenizer, TokenizerConfig
from policies.base import ActionHead
from vla.types import Prefix

TOKENIZER_DIR = "tokenizer"


def vocab_bound(cfg: TokenizerConfig, max_action_dim: int) -> int:
    """Largest vocabulary a tokenizer of this config can have once fitted (the table size)."""
    name = cfg.type
    if name == "uniform":
        return cfg.n_bins
    if name == "fast":
        return cfg.vocab_size
    if name == "msvq":
        return cfg.codebook_size
    bound = getattr(cfg, "vocab_bound", None)  # adaptive_grid and plugin tokenizers declare their own bound
    if bound is None:
        raise ValueError(f"tokenizer {name!r}: token heads need its vocabulary bound; give its config a "
                         "`vocab_bound(max_action_dim) -> int` method")
    return int(bound(max_action_dim))


def length_bound(cfg: TokenizerConfig, chunk_size: int, max_action_dim: int) -> int:
    """Most codes a chunk can take (FAST's BPE never yields more tokens than DCT coefficients)."""
    if cfg.type == "msvq":  # per_dimension: each scale has one code per action dimension
        return int(sum(cfg.scales)) * (max_action_dim if cfg.per_dimension else 1)
    return chunk_size * max_action_dim


GREEDY = ("argmax", "expected")


def check_decoding(cfg: Any, tokenizer: ActionTokenizer, per_position: bool) -> None:
    """Validate a token head's execution settings (they can be changed at load time: ``overrides``):
    ``temperature`` >= 0, ``top_k`` >= 0, ``greedy`` in GREEDY, ``greedy_first`` a bool that needs
    ``greedy="argmax"``; ``per_position``: the head decodes
    'expected' through ``code_values``."""
    if not cfg.temperature >= 0:
        raise ValueError(f"head.temperature: expected >= 0 (0 = greedy), received {cfg.temperature!r}")
    if not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        raise ValueError(f"head.top_k: expected an int >= 0 (0 = the whole vocabulary), received {cfg.top_k!r}")
    greedy = cfg.greedy
    if greedy not in GREEDY:
        raise ValueError(f"head.greedy: expected one of {GREEDY}, got {greedy!r}")
    if not isinstance(cfg.greedy_first, bool):
        raise ValueError(f"head.greedy_first: expected true or false, received {cfg.greedy_first!r}")
    if cfg.greedy_first and greedy != "argmax":
        raise ValueError(f"head.greedy_first=true decodes candidate 0 by argmax, but head.greedy={greedy!r}: "
                         "use greedy='argmax' or greedy_first=false")
    joint = bool(getattr(tokenizer.config, "spherical_dims", None))  # adaptive_grid's joint xyz token
    if greedy == "expected" and per_position and (type(tokenizer).code_values is ActionTokenizer.code_values or joint):
        what = "the spherical grid's joint token" if joint else repr(tokenizer.config.type)
        raise ValueError(f"head.greedy='expected' needs a tokenizer whose codes decode one value per position "
                         f"(uniform, adaptive_grid without spherical_dims); {what} does not: use greedy='argmax'")


class TokenHead(ActionHead):
    """Base of token heads: owns the tokenizer and the code <-> tensor plumbing."""

    def __init__(self, tokenizer_cfg: TokenizerConfig, tokenizer_path: str | None, chunk_size: int,
                 action_dim: int, state_dim: int, hidden: int):
        super().__init__()
        self.chunk_size, self.action_dim = chunk_size, action_dim
        self.tokenizer: ActionTokenizer = tokenizer_cfg.build()
        self.tokenizer_path = tokenizer_path
        self.vocab = vocab_bound(tokenizer_cfg, action_dim)
        self.max_codes = length_bound(tokenizer_cfg, chunk_size, action_dim)
        self.state_in = nn.Linear(state_dim, hidden)
        self.hidden = hidden

    # --- the tokenizer's life cycle ----------------------------------------------------------
    def fit_tokenizer(self, chunks: np.ndarray) -> None:
        """Fit on normalized dataset chunks (N, H, A_data); ``tokenizer_path`` loads a pre-fitted one instead."""
        if self.tokenizer_path:
            tok = ActionTokenizer.from_pretrained(self.tokenizer_path)
            if tok.config.type != self.tokenizer.config.type:
                raise ValueError(f"head.tokenizer_path={self.tokenizer_path!r} holds a {tok.config.type!r} tokenizer, "
                                 f"but head.tokenizer.type is {self.tokenizer.config.type!r}")
            self.tokenizer = tok
        else:
            self.tokenizer.fit(chunks)
        tok = self.tokenizer
        if tok.horizon != self.chunk_size or tok.action_dim > self.action_dim:
            raise ValueError(f"tokenizer fitted on chunks (H={tok.horizon}, A={tok.action_dim}); the policy needs "
                             f"H=chunk_size={self.chunk_size} and A <= max_action_dim={self.action_dim}")
        if tok.vocab_size > self.vocab:
            raise ValueError(f"tokenizer vocabulary {tok.vocab_size} exceeds the head's table ({self.vocab})")

    def _require_tokenizer(self) -> ActionTokenizer:
        if not self.tokenizer.is_fitted:
            raise RuntimeError(f"{type(self).__name__}: the action tokenizer is not fitted; `vla train` fits it on the "
                               "dataset, or call head.fit_tokenizer(normalized_chunks) / load a checkpoint")
        return self.tokenizer

    def save_assets(self, path: Path) -> None:
        self._require_tokenizer().save_pretrained(Path(path) / TOKENIZER_DIR)

    def load_assets(self, path: Path) -> None:
        src = Path(path) / TOKENIZER_DIR
        if not src.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: the checkpoint has no fitted tokenizer at {src}")
        self.tokenizer = ActionTokenizer.from_pretrained(src)

    # --- actions <-> codes ------------------------------------------------------------------
    def check_action_dims(self, dim_mask: Tensor | None) -> ActionTokenizer:
        """The fitted tokenizer, after checking that no row has more valid action dims than it was fitted on."""
        tok = self._require_tokenizer()
        if dim_mask is not None:
            n_valid = int(dim_mask.sum(-1).max())
            if n_valid > tok.action_dim:
                raise ValueError(f"actions have {n_valid} valid dims but the tokenizer was fitted on {tok.action_dim}")
        return tok

    def encode_actions(self, actions: Tensor, dim_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Normalized (B, H, A_max) -> codes (B, L) long and code mask (B, L) bool on the actions' device."""
        tok = self.check_action_dims(dim_mask)
        codes, mask = tok.encode(actions[..., : tok.action_dim].detach().float().cpu().numpy())
        dev = actions.device
        return torch.from_numpy(codes).to(dev), torch.from_numpy(mask).to(dev)

    def decode_codes(self, codes: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """codes (M, L) -> actions (M, H, A_max) float32 (padded dims 0, invalid rows NaN), valid (M,)."""
        tok = self._require_tokenizer()
        acts, valid = tok.decode(codes.cpu().numpy(), None if mask is None else mask.cpu().numpy())
        out = torch.zeros(len(acts), self.chunk_size, self.action_dim)
        out[..., : tok.action_dim] = torch.from_numpy(acts).float()
        return out.to(codes.device), torch.from_numpy(valid).to(codes.device)

    def expected_chunks(self, logits: Tensor) -> Tensor:
        """Masked logits (M, L, V_out) over per-position codes -> (M, H, A_max) float32: each position's
        expected value under softmax(logits), ``sum_k p_k * value_k`` (``ActionTokenizer.code_values``),
        instead of the argmax code's. Exact where the model is sure, between two bins where it hesitates."""
        tok = self._require_tokenizer()
        table = tok.code_values()
        if table is None:
            raise ValueError(f"head.greedy='expected': the {tok.config.type!r} tokenizer has no per-position code "
                             "values (e.g. adaptive_grid with spherical_dims); use greedy='argmax'")
        values = torch.from_numpy(table).to(device=logits.device, dtype=torch.float64)  # (L, V)
        length, v = values.shape
        if logits.shape[1] != length:
            raise ValueError(f"expected_chunks: {logits.shape[1]} code positions, the tokenizer has {length}")
        probs = logits[..., :v].double().softmax(-1)  # masked ids (-inf) get 0
        mean = (probs * values).sum(-1).view(-1, tok.horizon, tok.tokens_per_step)  # (M, H, A)
        out = torch.zeros(len(mean), self.chunk_size, self.action_dim, device=logits.device)
        out[..., : tok.action_dim] = mean.float()
        return out

    def step_loss(self, nll: Tensor, code_mask: Tensor, is_pad: Tensor) -> Tensor:
        """Token NLL (B, L) -> per-step loss (B, H); ``sum(-1)`` = the chunk's NLL over valid steps."""
        tok = self.tokenizer
        nll = nll * code_mask.to(nll.dtype)
        valid = (~is_pad.bool()).to(nll.dtype)
        b, h = is_pad.shape
        if getattr(tok, "codes_per_step", None) and nll.shape[1] == h * tok.tokens_per_step:
            return nll.view(b, h, tok.tokens_per_step).sum(-1) * valid  # padded steps' codes do not count
        return nll.sum(-1, keepdim=True) * valid / valid.sum(-1, keepdim=True).clamp(min=1.0)

    # --- the loss: teacher forcing through the head's own ``logits`` ------------------------------
    def targets(self, actions: Tensor, prefix: Prefix) -> tuple[Tensor, Tensor]:
        """Codes (B, L) and mask (B, L) the head is trained to predict (heads may add an EOS)."""
        return self.encode_actions(actions, prefix.extras.get("action_dim_mask"))

    def logits(self, backbone, prefix: Prefix, codes: Tensor) -> tuple[Tensor, Tensor]:
        """codes (B, L) -> logits (B, L, V) and the hidden states that produced them."""
        raise NotImplementedError

    def training_codes(self, actions: Tensor, prefix: Prefix) -> tuple[Tensor, Tensor, Tensor]:
        """What ``loss`` feeds the head and what it predicts: (input codes, target codes, mask), each (B, L).
        The chunk's own codes for both (teacher forcing); a head may feed other inputs while training."""
        codes, mask = self.targets(actions, prefix)
        return codes, codes, mask

    def loss(self, backbone, prefix: Prefix, actions: Tensor, is_pad: Tensor, **kw) -> Tensor:
        """(B, H) per-step NLL of the chunk's codes; ``sum(-1)`` is the exact sequence NLL (unless
        ``training_codes`` feeds other inputs or ``code_weights`` weighs the codes, e.g. coarse_to_fine's
        ``code_noise`` and ``scale_loss`` in train mode)."""
        inputs, codes, mask = self.training_codes(actions, prefix)
        logits, _ = self.logits(backbone, prefix, inputs)
        nll = F.cross_entropy(logits.float().transpose(1, 2), codes, reduction="none")  # (B, L)
        weights = self.code_weights(nll.shape[1], nll.device)
        return self.step_loss(nll if weights is None else nll * weights, mask, is_pad)

    def code_weights(self, length: int, device) -> Tensor | None:
        """(L,) weights of the codes' NLL in ``loss``, or None (all 1: the exact sequence NLL)."""
        return None

    # --- shared pieces of the forward pass ------------------------------------------------------
    def state_token(self, prefix: Prefix) -> Tensor:
        """(B, 1, hidden): the normalized robot state as the first suffix token."""
        s = prefix.extras["state"]
        if "state_mask" in prefix.extras:
            s = s * prefix.extras["state_mask"].to(s.dtype)
        return self.state_in(s.to(self.state_in.weight.dtype))[:, None]

    @staticmethod
    def pick(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None,
             greedy_every: int = 0) -> Tensor:
        """Sample ids from logits (..., V): greedy at temperature 0, else softmax(logits / T) over the top k.
        ``greedy_every`` = n > 0: rows 0, n, 2n, ... of dim 0 (candidate 0 of each observation, rows being
        B*n observation-major) take the argmax instead (``head.greedy_first``)."""
        if temperature < 0:
            raise ValueError(f"temperature: expected >= 0, got {temperature}")
        if temperature == 0:
            return logits.argmax(-1)
        if greedy_every == 1:  # every row is a candidate 0 (N=1): no draw to make
            return logits.argmax(-1)
        if greedy_every > 1:
            ids = TokenHead.pick(logits, temperature, top_k, generator)
            ids[::greedy_every] = logits[::greedy_every].argmax(-1)
            return ids
        x = logits.float() / temperature
        if 0 < top_k < x.shape[-1]:
            kth = x.topk(top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        probs = F.softmax(x, dim=-1).reshape(-1, x.shape[-1])
        ids = torch.multinomial(probs.cpu() if generator is not None else probs, 1, generator=generator)
        return ids.to(logits.device).view(x.shape[:-1])

    def logit_mask(self, length: int, width: int, device) -> Tensor:
        """(length, width) bool: ids the fitted tokenizer can decode at each code position. Columns
        past the table (an EOS id at ``self.vocab``) stay allowed; the caller masks them if unused."""
        tok = self._require_tokenizer()
        m = torch.zeros(length, width, dtype=torch.bool)
        m[:, : tok.vocab_size] = True
        m[:, self.vocab:] = True
        allowed = tok.allowed_codes(length)
        if allowed is not None:
            m[:, : tok.vocab_size] = torch.from_numpy(allowed)
        return m.to(device)
