"""Normalization statistics of state and action, computed from a dataset's parquet files.

    stats = compute_stats("data/debug")             # {"observation.state": {"mean": (S,), ...}, "action": {...}}
    save_stats(stats, "stats.json"); load_stats("stats.json")

Only the requested columns are read (pyarrow column projection), so image bytes stored inside
the parquet files are never loaded or decoded: a dataset of a million frames takes seconds.
Statistics are per dimension: mean, std (population, like lerobot), min, max, q01, q99, count.
They are accumulated in float64 and stored as float32, the dtype the model sees.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

STAT_NAMES = ("mean", "std", "min", "max", "q01", "q99", "count")


def _resolve(ds_or_root: Any, episodes: Sequence[int] | None) -> tuple[Path, list[int] | None]:
    if isinstance(ds_or_root, (str, Path)):
        return Path(ds_or_root), None if episodes is None else list(episodes)
    root = getattr(ds_or_root, "root", None)
    if root is None:
        raise TypeError(f"compute_stats: expected a dataset root or a LeRobotDataset, got {type(ds_or_root).__name__}")
    if episodes is None:
        episodes = getattr(ds_or_root, "episodes", None)  # a LeRobotDataset loaded with a subset
    return Path(root), None if episodes is None else list(episodes)


def _column_to_array(column, key: str) -> np.ndarray:
    """A pyarrow column of fixed-size lists (or scalars) -> (N, D) float64."""
    import pyarrow as pa

    arr = pa.concat_arrays(column.chunks) if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_fixed_size_list(arr.type) or pa.types.is_list(arr.type):
        values = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        n = len(arr)
        if n and values.size % n:
            raise ValueError(f"{key}: rows of unequal length in the parquet data")
        return values.reshape(n, -1 if n else 0)
    if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type):
        return arr.to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, 1)
    raise TypeError(f"{key}: cannot compute statistics of a column of type {arr.type}")


def read_columns(root: str | Path, keys: Sequence[str], episodes: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Read ``keys`` of every frame (optionally only ``episodes``) -> {key: (N, D) float64}."""
    import pyarrow.parquet as pq

    root = Path(root)
    files = sorted((root / "data").glob("**/*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files under {str(root / 'data')!r}: "
                                f"is {str(root)!r} a LeRobot v3 dataset?")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for f in files:
        names = pq.read_schema(f).names
        missing = [k for k in keys if k not in names]
        if missing:
            known = [n for n in names if not n.startswith("observation.images.")]
            raise KeyError(f"compute_stats: key(s) {missing} not in the dataset {str(root)!r}; its columns are {known}")
        table = pq.read_table(f, columns=list(dict.fromkeys([*keys, "episode_index"])))
        if episodes is not None:
            ep = table.column("episode_index").to_numpy()
            keep = np.isin(ep, np.asarray(list(episodes)))
            if not keep.any():
                continue
            table = table.filter(keep)
        for k in keys:
            parts[k].append(_column_to_array(table.column(k), k))
    out = {}
    for k in keys:
        if not parts[k] or sum(len(p) for p in parts[k]) == 0:
            raise ValueError(f"compute_stats: no frames for key {k!r} in {str(root)!r} (episodes={episodes})")
        out[k] = np.concatenate(parts[k], axis=0)
    return out


def stats_from_array(x: np.ndarray, key: str = "array") -> dict[str, np.ndarray]:
    """(N, D) values -> per-dimension statistics. Non-finite values are an error, never averaged in."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{key}: expected a non-empty (N, D) array, got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise ValueError(f"{key}: {int(bad.sum())} non-finite values in the data "
                         f"(first at frame {rows[0]}, dim {cols[0]})")
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    f32 = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731
    return {
        "mean": f32(x.mean(0)),
        "std": f32(x.std(0)),
        "min": f32(x.min(0)),
        "max": f32(x.max(0)),
        "q01": f32(q01),
        "q99": f32(q99),
        "count": np.full(x.shape[1], x.shape[0], dtype=np.int64),
    }


def compute_stats(
    ds_or_root: Any,
    keys: Sequence[str] = ("observation.state", "action"),
    episodes: Sequence[int] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-dimension stats of ``keys`` over every frame of a dataset (root path or ``LeRobotDataset``).

    A ``LeRobotDataset`` loaded with an episode subset gives the stats of that subset.
    Returns ``{key: {"mean"|"std"|"min"|"max"|"q01"|"q99": (D,) float32, "count": (D,) int64}}``.
    """
    root, episodes = _resolve(ds_or_root, episodes)
    arrays = read_columns(root, keys, episodes)
    return {k: stats_from_array(arrays[k], k) for k in keys}


# --- json (exact float32 round trip) ------------------------------------------------------------
# A float32 widened to a Python float is exact, and json writes the shortest repr that reads
# back to the same float64, so float32 -> json -> float64 -> float32 is bit-exact.


def stats_to_jsonable(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    for key, st in stats.items():
        out[key] = {}
        for name, v in st.items():
            a = np.asarray(v)
            if name == "count":
                out[key][name] = [int(c) for c in a.reshape(-1)]
            else:
                out[key][name] = [float(c) for c in a.astype(np.float32).reshape(-1)]
    return out


def stats_from_jsonable(data: dict[str, dict[str, list]]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, st in data.items():
        if not isinstance(st, dict):
            raise ValueError(f"stats[{key!r}]: expected a dict of statistics, got {type(st).__name__}")
        out[key] = {
            name: np.asarray(v, dtype=np.int64 if name == "count" else np.float32) for name, v in st.items()
        }
        dims = {name: a.shape for name, a in out[key].items()}
        if len(set(dims.values())) > 1:
            raise ValueError(f"stats[{key!r}]: statistics of different shapes {dims}")
    return out


def save_stats(stats: dict[str, dict[str, np.ndarray]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats_to_jsonable(stats), indent=1))
    return path


def load_stats(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    return stats_from_jsonable(json.loads(Path(path).read_text()))
