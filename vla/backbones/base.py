"""The ``Backbone`` contract every vision-language backbone implements.

A backbone turns an :class:`~vla.types.Observation` into a :class:`~vla.types.Prefix` in ONE pass and
exposes the geometry of its attention cache (``kv_spec``) so that action experts can attend to it
layer by layer (pi0 style). Token heads continue the language model over the prefix with
:meth:`Backbone.extend`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from vla.types import Observation, Prefix


@dataclass(frozen=True)
class KVSpec:
    """Shape of the prefix cache: ``num_layers`` entries of (B, num_kv_heads, T, head_dim)."""

    num_layers: int
    num_heads: int  # query heads of the backbone's attention (experts reuse it)
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # "default" = plain RoPE on 1-D positions (what action experts apply to their own tokens); "mrope" is
    # fine too (text/suffix positions are equal on its axes). Scaled variants (llama3, yarn, ...) are not.
    rope_type: str = "default"


class Backbone(nn.Module):
    """Base class. Subclasses set ``hidden_size``/``kv_spec``/``vocab_size`` and implement the methods."""

    hidden_size: int
    kv_spec: KVSpec
    vocab_size: int

    def __init__(self) -> None:
        super().__init__()
        # Counts encode_prefix calls; tests and benchmarks use it to prove the prefix is reused.
        self.prefix_passes = 0

    # --- text ---------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        """Prompts -> (ids (B, L) long, mask (B, L) bool), right-padded to the longest prompt.

        A prompt longer than ``max_length`` tokens raises ``ValueError`` (never silent truncation).
        """
        raise NotImplementedError

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, hidden_size) input embeddings of the language model."""
        raise NotImplementedError

    # --- the prefix ---------------------------------------------------------------------------
    def encode_prefix(self, obs: Observation) -> Prefix:
        self.prefix_passes += 1
        return self._encode_prefix(obs)

    def _encode_prefix(self, obs: Observation) -> Prefix:
        raise NotImplementedError

    def extend(
        self,
        embeds: Tensor,
        prefix: Prefix,
        attn_mask: Tensor | None = None,
        *,
        return_prefix: bool = False,
    ) -> Tensor | tuple[Tensor, Prefix]:
        """Run the language model over new tokens that attend to the prefix cache.

        embeds:    (B, T, hidden_size) input embeddings of the new tokens
        attn_mask: (B, T, T) or (T, T) bool among the new tokens (True = may attend); default causal
        returns:   (B, T, hidden_size) final hidden states; with ``return_prefix`` also the prefix
                   extended by the new tokens (their keys/values appended, mask True).
        """
        raise NotImplementedError

    # --- checkpoints ----------------------------------------------------------------------------
    def save_assets(self, path: Path) -> None:
        """Write what the config alone cannot rebuild (tokenizer/processor files) into ``path``."""

    @classmethod
    def lora_targets(cls) -> str:
        """Regex of module names LoRA should wrap by default."""
        return r".*(q_proj|k_proj|v_proj|o_proj).*"


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids that skip padding: (B, T) bool -> (B, T) long, ``cumsum(mask) - 1`` (pi0)."""
    return torch.cumsum(mask.long(), dim=-1) - 1
