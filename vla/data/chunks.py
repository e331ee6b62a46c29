"""Action chunks from a LeRobot dataset, to fit tokenizers on (``vla tokenizer fit`` and benchmarks).

Chunks are windows of ``horizon`` consecutive frames inside one episode: a window never crosses an
episode boundary, and the last ``horizon - 1`` frames of an episode start no window (no padding, so
a tokenizer never fits on padded actions). Only the action and episode columns are read from the
parquet files (no images), so this takes seconds on any local dataset.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def make_chunks(actions: np.ndarray, episode_index: np.ndarray, horizon: int, stride: int = 1) -> np.ndarray:
    """(T, A) frames + (T,) episode ids (frames of an episode contiguous, in time order) ->
    (N, horizon, A) windows starting every ``stride`` frames within each episode."""
    actions = np.asarray(actions)
    episode_index = np.asarray(episode_index).reshape(-1)
    if actions.ndim != 2 or len(actions) != len(episode_index):
        raise ValueError(f"make_chunks: expected actions (T, A) and episode_index (T,), "
                         f"got {actions.shape} and {episode_index.shape}")
    if horizon < 1 or stride < 1:
        raise ValueError(f"make_chunks: horizon and stride must be >= 1, got {horizon}, {stride}")
    bounds = np.flatnonzero(np.diff(episode_index) != 0) + 1
    starts = []
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(actions)]):
        starts.extend(range(int(lo), int(hi) - horizon + 1, stride))
    if not starts:
        raise ValueError(f"make_chunks: no episode has {horizon} frames")
    idx = np.asarray(starts)[:, None] + np.arange(horizon)[None, :]
    return actions[idx]


def chunks_from_dataset(
    root: str | Path,
    horizon: int,
    key: str = "action",
    episodes: Sequence[int] | None = None,
    stride: int = 1,
    max_chunks: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """(N, horizon, A) raw (unnormalized) action chunks of a local LeRobot dataset; ``max_chunks``
    keeps a seeded random subset."""
    from vla.data.stats import read_columns

    cols = read_columns(root, [key, "episode_index"], episodes)
    chunks = make_chunks(cols[key], cols["episode_index"][:, 0].astype(np.int64), horizon, stride)
    if max_chunks is not None and len(chunks) > max_chunks:
        keep = np.sort(np.random.default_rng(seed).choice(len(chunks), max_chunks, replace=False))
        chunks = chunks[keep]
    return chunks
