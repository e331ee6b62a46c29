"""``vla tokenizer fit``: fit an action tokenizer on a LeRobot dataset's action chunks and save it.

    vla tokenizer fit --tokenizer.type=fast --dataset=data/metaworld-mt10 --horizon=8 --out=outputs/fast_tok
    vla tokenizer fit --tokenizer.type=msvq --tokenizer.steps=2000 --dataset=... --out=...

Tokenizers work on NORMALIZED actions (the policy normalizes before tokenizing), so the fit uses the
same statistics the policy will use: the dataset's, in the given mode. They are saved next to the
tokenizer (``action_stats.json``), and the reconstruction error on the fit chunks is printed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from action_tokenizers.base import TokenizerConfig


@dataclass
class FitConfig:
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig.get_choice_class("fast")())
    dataset: str = ""  # local LeRobot dataset root
    out: str = ""  # folder to save the tokenizer into
    horizon: int = 8  # chunk length H (the policy's chunk_size)
    key: str = "action"
    normalization: str = "mean_std"  # mean_std | quantile | identity: as the policy's normalization.action
    max_chunks: int | None = 20000  # a seeded random subset (fitting BPE / VQ on millions is unnecessary)
    seed: int = 0


def fit(cfg: FitConfig) -> dict:
    from vla.data.chunks import chunks_from_dataset
    from vla.data.normalize import Normalizer
    from vla.data.stats import compute_stats, save_stats

    if not cfg.dataset or not cfg.out:
        raise ValueError(f"vla tokenizer fit: --dataset and --out are required (got dataset={cfg.dataset!r}, "
                         f"out={cfg.out!r})")
    start = time.time()
    raw = chunks_from_dataset(cfg.dataset, cfg.horizon, key=cfg.key, max_chunks=cfg.max_chunks, seed=cfg.seed)
    stats = compute_stats(cfg.dataset, keys=(cfg.key,))
    norm = Normalizer(stats, {cfg.key: cfg.normalization})
    chunks = norm.normalize(cfg.key, torch.from_numpy(raw).float()).numpy()
    tok = cfg.tokenizer.build()
    tok.fit(chunks)
    codes, mask = tok.encode(chunks)
    recon, valid = tok.decode(codes, mask)
    err = np.abs(recon[valid] - chunks[valid])
    out = Path(cfg.out)
    tok.save_pretrained(out)
    save_stats(stats, out / "action_stats.json")
    summary = {"type": cfg.tokenizer.type, "chunks": int(len(chunks)), "horizon": cfg.horizon,
               "vocab_size": int(tok.vocab_size), "tokens_per_chunk": float(mask.sum(1).mean()),
               "valid": float(valid.mean()), "mean_abs_err": float(err.mean()) if err.size else None,
               "max_abs_err": float(err.max()) if err.size else None, "normalization": cfg.normalization,
               "wall_time_s": round(time.time() - start, 2)}
    (out / "fit_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    from vla.config import parse_config

    if not argv or argv[0] != "fit":
        print("usage: vla tokenizer fit --tokenizer.type=NAME --dataset=ROOT --out=DIR [--horizon=8 ...]")
        return 2
    summary = fit(parse_config(FitConfig, FitConfig(), argv[1:]))
    for k, v in summary.items():
        print(f"{k:18s} {v}")
    print(f"saved to {parse_config(FitConfig, FitConfig(), argv[1:]).out}")
    return 0
