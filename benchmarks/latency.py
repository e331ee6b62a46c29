"""Chunk latency of a policy: one backbone pass, then N candidate chunks from the same prefix.

    python -m benchmarks.latency [--presets debug metaworld] [--samples 1 16] [--repeats 20] [--threads 2]
                                 [--bf16] [--compare-repeated]

Prints a table and writes benchmarks/results/latency.json. Target (foundation issue): 16 candidates
cost at most 2x one, because the prefix (images + language) is computed once and only the small
action expert runs per candidate. ``--compare-repeated`` adds, side by side, rows where the flow
head's N candidates attend to N copies of the context (``Prefix.repeat``, the implementation before
``attend_shared_prefix``), so the gain of the shared cache is measured in the same run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import median_ms, print_table, provenance, write_json


def measure(preset: str, samples: list[int], repeats: int, bf16: bool = False, repeated: bool = False) -> dict:
    from vla.testing import random_observation
    from vla.policy import VLAPolicy
    from vla.presets import get_preset

    cfg = get_preset(preset).policy
    torch.manual_seed(0)
    policy = VLAPolicy(cfg).eval()
    obs = random_observation(policy, batch=1, prompts=["pick up the puck"])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    row: dict = {"preset": preset, "bf16": bf16, "cache": "repeated" if repeated else "shared",
                 "flow_steps": getattr(cfg.head, "num_steps", None)}
    if repeated:  # the old path: N copies of the context; the head then runs plain attention on them
        shared_with_state, n_now = policy.head.with_state, [1]
        policy.head.with_state = lambda prefix: shared_with_state(prefix).repeat(n_now[0])
    with torch.no_grad(), ctx:
        prefix = policy.encode(obs)
        row["prefix_tokens"] = int(prefix.mask.shape[1])
        row["prefix_ms"] = round(median_ms(lambda: policy.encode(obs), repeats), 2)
        for n in samples:
            if repeated:
                n_now[0] = n
            row[f"chunk_ms_N{n}"] = round(median_ms(lambda: policy.sample_actions(obs, num_samples=n), repeats), 2)
            row[f"head_ms_N{n}"] = round(median_ms(lambda: policy.head.sample(policy.backbone, prefix, num_samples=n), repeats), 2)
    if len(samples) >= 2:
        lo, hi = min(samples), max(samples)
        row[f"ratio_N{hi}/N{lo}"] = round(row[f"chunk_ms_N{hi}"] / row[f"chunk_ms_N{lo}"], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["debug", "metaworld"])
    p.add_argument("--samples", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="also measure with bf16 autocast")
    p.add_argument("--compare-repeated", action="store_true",
                   help="also measure the flow head with the context repeated per candidate (the old path)")
    p.add_argument("--out", default="benchmarks/results/latency.json")
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    rows = []
    for preset in args.presets:
        for bf16 in (False, True) if args.bf16 else (False,):
            rows.append(measure(preset, args.samples, args.repeats, bf16=bf16))
            if args.compare_repeated:
                rows.append(measure(preset, args.samples, args.repeats, bf16=bf16, repeated=True))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print_table(rows, cols)
    out = write_json(Path(args.out), {"rows": rows, "threads": args.threads, "repeats": args.repeats,
                                      **provenance(started)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
