"""FAST: frequency-space action tokenization (Pertsch et al., 2025).

Consecutive actions in a chunk are strongly correlated, so one token per (step, dim) carries little
information each. FAST compresses first, then tokenizes:

1. DCT-II along time, per dimension, orthonormal (``scipy.fft.dct(norm="ortho")``): a smooth chunk
   puts almost all its energy into the few lowest frequencies.
2. Multiply by ``scale`` and round to integers: high frequencies of smooth chunks round to 0.
3. Flatten low frequencies first, the dimensions interleaved per frequency (index ``f * A + a``), so
   the long runs of zeros from the high frequencies come last and compress well.
4. Map each integer to one character and run a byte-pair encoding (the ``tokenizers`` library) trained
   on the fit data: frequent patterns (e.g. "all remaining coefficients are 0") become single tokens.

The character mapping follows FAST's: integer ``v`` -> ``chr(BASE + v - min_int)`` where ``min_int``
and ``max_int`` are the extremes seen in ``fit`` (the BPE's initial alphabet is exactly that range).
We start at BASE = U+4E00 (CJK ideographs: 20k consecutive letters, no whitespace or control
characters) instead of U+0000. Integers outside the fitted range are clipped to it when encoding.

Decoding is exact up to step 2's rounding: BPE is lossless. A code sequence is invalid (``valid=False``)
when an id is outside the vocabulary, or the decoded string is not exactly ``H * A`` characters of the
alphabet — an unconstrained autoregressive head can sample such sequences. :meth:`length_constraint`
gives each id's character count, so the discrete head can constrain decoding to rows of exactly
``H * A`` characters (every BPE string is in the alphabet, so such rows always decode).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from action_tokenizers.base import ActionTokenizer, TokenizerConfig

BASE = 0x4E00  # first CJK unified ideograph
MAX_ALPHABET = 0x9FFF - BASE + 1  # contiguous ideographs available
BPE_FILE = "bpe.json"


@TokenizerConfig.register_subclass("fast")
@dataclass
class FastConfig(TokenizerConfig):
    vocab_size: int = 1024  # BPE vocabulary (>= the integer alphabet); training may stop below it
    scale: float = 10.0  # DCT coefficients are multiplied by this before rounding (higher = finer)
    min_frequency: int = 2  # a pair must occur this often to be merged

    @classmethod
    def tiny(cls) -> "FastConfig":
        return cls(vocab_size=128)

    def build(self) -> "FastTokenizer":
        return FastTokenizer(self)


def dct_quantize(x: np.ndarray, scale: float) -> np.ndarray:
    """(N, H, A) actions -> (N, H, A) rounded DCT coefficients (as float; axis 1 is now frequency)."""
    from scipy.fft import dct

    return np.around(dct(x, type=2, axis=1, norm="ortho") * scale)


def dct_dequantize(q: np.ndarray, scale: float) -> np.ndarray:
    """Inverse of :func:`dct_quantize` up to its rounding: (N, H, A) coefficients -> actions."""
    from scipy.fft import idct

    return idct(q / scale, type=2, axis=1, norm="ortho")


class FastTokenizer(ActionTokenizer):
    fixed_length = False
    config: FastConfig

    def __init__(self, config: FastConfig):
        if not config.scale > 0:
            raise ValueError(f"fast.scale: expected > 0, got {config.scale}")
        if config.vocab_size < 2:
            raise ValueError(f"fast.vocab_size: expected >= 2, got {config.vocab_size}")
        super().__init__(config)
        self.min_int: int | None = None
        self.max_int: int | None = None
        self._bpe = None  # tokenizers.Tokenizer
        self._id_to_str: list[str] = []

    @property
    def vocab_size(self) -> int:
        self._require_fitted("vocab_size")  # the trained BPE may hold fewer tokens than asked
        return len(self._id_to_str)

    def length_constraint(self) -> tuple[np.ndarray, int]:
        """The characters (= DCT coefficients) each BPE id stands for, and the H * A a row needs."""
        self._require_fitted("length_constraint")
        return np.array([len(t) for t in self._id_to_str], dtype=np.int64), self.horizon * self.action_dim

    # --- fit ------------------------------------------------------------------------------------
    def _fit(self, x: np.ndarray) -> None:
        from tokenizers import Tokenizer, models, trainers

        q = dct_quantize(x, self.config.scale)
        self.min_int, self.max_int = int(q.min()), int(q.max())
        n_chars = self.max_int - self.min_int + 1
        if n_chars > MAX_ALPHABET:
            raise ValueError(f"fast.scale: DCT integers span {n_chars} values (> {MAX_ALPHABET} characters); "
                             f"are the actions normalized? lower scale (got {self.config.scale})")
        if n_chars > self.config.vocab_size:
            raise ValueError(f"fast.vocab_size: the DCT integers of the fit data span {n_chars} values, and every one "
                             f"needs a token; expected vocab_size >= {n_chars}, got {self.config.vocab_size}")
        bpe = Tokenizer(models.BPE())  # no pre-tokenizer: a chunk's whole string is one "word"
        trainer = trainers.BpeTrainer(
            vocab_size=self.config.vocab_size,
            min_frequency=self.config.min_frequency,
            initial_alphabet=[chr(BASE + i) for i in range(n_chars)],
            show_progress=False,
            special_tokens=[],
        )
        bpe.train_from_iterator(self._to_strings(q), trainer=trainer)
        self._set_bpe(bpe)

    def _set_bpe(self, bpe) -> None:
        self._bpe = bpe
        vocab = bpe.get_vocab()
        self._id_to_str = [""] * len(vocab)
        for s, i in vocab.items():
            self._id_to_str[i] = s

    def _to_strings(self, q: np.ndarray) -> list[str]:
        ints = np.clip(q, self.min_int, self.max_int).astype(np.int64) - self.min_int  # (N, F, A)
        flat = ints.reshape(len(q), -1) + BASE  # frequency-major, dims interleaved: f * A + a
        return ["".join(map(chr, row)) for row in flat.tolist()]

    # --- encode / decode ------------------------------------------------------------------------
    def _encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        enc = self._bpe.encode_batch(self._to_strings(dct_quantize(x, self.config.scale)), add_special_tokens=False)
        lengths = [len(e.ids) for e in enc]
        codes = np.zeros((len(x), max(lengths)), dtype=np.int64)
        mask = np.zeros(codes.shape, dtype=bool)
        for i, e in enumerate(enc):
            codes[i, : lengths[i]] = e.ids
            mask[i, : lengths[i]] = True
        return codes, mask

    def _decode(self, codes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, A, V = self.horizon, self.action_dim, len(self._id_to_str)
        n_chars = self.max_int - self.min_int + 1
        q = np.zeros((len(codes), H * A))
        valid = np.zeros(len(codes), dtype=bool)
        for i, (row, m) in enumerate(zip(codes.tolist(), mask.tolist())):
            ids = [c for c, keep in zip(row, m) if keep]
            if not ids or min(ids) < 0 or max(ids) >= V:
                continue
            ints = np.fromiter(map(ord, "".join(self._id_to_str[c] for c in ids)), dtype=np.int64) - BASE
            if len(ints) != H * A or ints.min() < 0 or ints.max() >= n_chars:
                continue
            q[i], valid[i] = ints + self.min_int, True
        return dct_dequantize(q.reshape(-1, H, A), self.config.scale), valid

    # --- persistence ----------------------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        return {"int_range": np.array([self.min_int, self.max_int], dtype=np.int64)}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        self.min_int, self.max_int = (int(v) for v in state["int_range"])

    def _save_extra(self, path: Path) -> None:
        self._bpe.save(str(path / BPE_FILE))

    def _load_extra(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._set_bpe(Tokenizer.from_file(str(path / BPE_FILE)))
