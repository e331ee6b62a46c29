"""Tokenizers for the small ``timm_lm`` language model.

``byte``: UTF-8 bytes shifted by one (0 = padding). No files, no training, any language, and it never
meets an unknown token — the right default for a language model trained from scratch on robot
instructions. Any Hugging Face tokenizer saved in a local folder can be used instead.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

PAD_ID = 0


def pad_batch(seqs: list[list[int]], max_length: int, pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into (ids (B, L) long, mask (B, L) bool); L = longest sequence."""
    for i, s in enumerate(seqs):
        if len(s) > max_length:
            raise ValueError(
                f"prompt {i} has {len(s)} tokens but max_prompt_len is {max_length}; "
                "raise policy.max_prompt_len or shorten the instruction"
            )
    length = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


class ByteTokenizer:
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:  # nothing to save: the config names it
        pass


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder (or a hub id when online)."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(name_or_path)
        self.vocab_size = len(self.tok)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save(self, path: Path) -> None:
        self.tok.save_pretrained(str(path))


def make_tokenizer(name: str, assets_dir: Path | None = None):
    if name == "byte":
        return ByteTokenizer()
    if assets_dir is not None and (assets_dir / "tokenizer_config.json").exists():
        return HFTokenizer(str(assets_dir))
    return HFTokenizer(name)
