"""Action tokenizers on real demonstration actions: tokens per chunk, reconstruction error, speed.

    python -m benchmarks.tokenizers --dataset data/metaworld_mt10_50

Chunks of H consecutive actions are cut inside episodes; the first 80% of the episodes fit the
tokenizers (and the mean/std normalization, the policy's default), the other 20% are encoded and
decoded. Errors are in normalized units (1 = one standard deviation of that action dimension).
Each tokenizer runs with its default config. Prints a table and writes ``benchmarks/results/tokenizers.json``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, provenance, write_json


# Named variants beside the registered defaults: name -> (registered tokenizer, config fields).
VARIANTS = {
    "adaptive_grid_spherical": ("adaptive_grid", {"spherical_dims": [0, 1, 2]}),  # MetaWorld: xyz + grip
    # the coarse_to_fine head's default msvq (joint chunk), and CARP's per-dimension layout at the same scales
    "msvq_c2f": ("msvq", {"scales": [1, 2, 4, 8], "steps": 1500}),
    "msvq_per_dim": ("msvq", {"scales": [1, 2, 4, 8], "steps": 1500, "per_dimension": True}),
}


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="local LeRobot dataset root, e.g. data/metaworld_mt10_50")
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--fit-chunks", type=int, default=3000)
    p.add_argument("--eval-chunks", type=int, default=1000)
    p.add_argument("--tokenizers", default="uniform,adaptive_grid,adaptive_grid_spherical,fast,msvq")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is reported)")
    p.add_argument("--out", default="benchmarks/results/tokenizers.json")
    args = p.parse_args(argv)
    started = time.time()

    from action_tokenizers import chunks_from_dataset, make_tokenizer
    from vla.config import to_dict
    from vla.data.stats import read_columns

    eps = np.unique(read_columns(args.dataset, ["episode_index"])["episode_index"][:, 0].astype(int))
    n_fit = int(round(0.8 * len(eps)))
    fit_raw = chunks_from_dataset(args.dataset, args.horizon, episodes=eps[:n_fit].tolist(), max_chunks=args.fit_chunks)
    ev_raw = chunks_from_dataset(args.dataset, args.horizon, episodes=eps[n_fit:].tolist(), max_chunks=args.eval_chunks)
    flat = fit_raw.reshape(-1, fit_raw.shape[-1])
    mean, std = flat.mean(0), np.maximum(flat.std(0), 1e-6)
    fit_x, ev_x = (fit_raw - mean) / std, (ev_raw - mean) / std

    rows = []
    for name in args.tokenizers.split(","):
        base, fields = VARIANTS.get(name, (name, {}))
        tok = make_tokenizer(base, **fields)
        t0 = time.perf_counter()
        tok.fit(fit_x)
        fit_s = time.perf_counter() - t0
        codes, mask = tok.encode(ev_x)
        y, valid = tok.decode(codes, mask)
        err = np.abs(y - ev_x)
        enc_s = _best_time(lambda: tok.encode(ev_x), args.repeats)
        dec_s = _best_time(lambda: tok.decode(codes, mask), args.repeats)
        tokens = mask.sum(1)
        rows.append({
            "tokenizer": name,
            "vocab": tok.vocab_size,
            "tokens/chunk": round(float(tokens.mean()), 2),
            "max tokens": int(tokens.max()),
            "mean |err|": round(float(err.mean()), 4),
            "max |err|": round(float(err.max()), 4),
            "rmse": round(float(np.sqrt((err ** 2).mean())), 4),
            "rmse per dim": [round(float(v), 4) for v in np.sqrt((err ** 2).mean((0, 1)))],
            "valid": round(float(valid.mean()), 4),
            "encode us/chunk": round(enc_s / len(ev_x) * 1e6, 1),
            "decode us/chunk": round(dec_s / len(ev_x) * 1e6, 1),
            "fit s": round(fit_s, 2),
            "config": to_dict(tok.config),
        })
    cols = ["tokenizer", "vocab", "tokens/chunk", "max tokens", "mean |err|", "max |err|", "rmse", "rmse per dim",
            "valid", "encode us/chunk", "decode us/chunk", "fit s"]
    print(f"{args.dataset}: H={args.horizon}, A={fit_x.shape[-1]}, fit {len(fit_x)} chunks "
          f"({n_fit} episodes), eval {len(ev_x)} chunks ({len(eps) - n_fit} held-out episodes); "
          f"errors in std units of the normalized actions")
    print_table(rows, cols)
    result = {
        "dataset": args.dataset,
        "horizon": args.horizon,
        "action_dim": int(fit_x.shape[-1]),
        "fit_chunks": len(fit_x),
        "eval_chunks": len(ev_x),
        "normalization": "mean_std (fit split)",
        "rows": rows,
        **provenance(started),
    }
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
