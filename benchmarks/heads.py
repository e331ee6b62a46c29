"""Action heads side by side on one backbone: forward passes per chunk, chunk latency for N = 1 and 16,
and (from evaluation results) closed-loop MT10 success at the same training budget.

    python -m benchmarks.heads [--dataset data/metaworld_mt10_50] [--samples 1 16] [--repeats 10] \\
        [--eval flow_matching=outputs/heads/flow/eval/results.json --eval discrete=A/results.json,B/results.json ...]
        [--skip-latency]   # only pool the evaluations (several results.json of one head: other seeds)

Every head is built on the CPU-default (`metaworld` preset) backbone with the same chunking; token
heads get their tokenizer fitted on the dataset's normalized chunks (random normal chunks without a
dataset). Latency is the median over ``--repeats`` runs, all measured in this one process, one after
the other (ratios are only meaningful side by side on this noisy machine). "suffix passes" counts the
forward passes after the prefix: backbone ``extend`` calls for token heads, action-expert passes for
the flow head. Writes benchmarks/results/heads.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import median_ms, pool_evals, print_table, provenance, write_json


def head_variants() -> dict[str, object]:
    from action_tokenizers.base import TokenizerConfig
    from policies.coarse_to_fine import CoarseToFineConfig
    from policies.discrete import DiscreteConfig
    from vla.presets import get_preset

    uniform = TokenizerConfig.get_choice_class("uniform")
    msvq = TokenizerConfig.get_choice_class("msvq")
    return {
        "flow_matching": get_preset("metaworld").policy.head,
        "discrete (autoregressive, uniform 256)": DiscreteConfig(tokenizer=uniform(n_bins=256)),
        "discrete (parallel, uniform 256)": DiscreteConfig(tokenizer=uniform(n_bins=256), decoding="parallel"),
        "coarse_to_fine (msvq 1-2-4-8)": CoarseToFineConfig(),
        # The finer tokenizer of RESULTS.md (a second residual level, K=1024: 23 codes, 5 passes). Fit steps do
        # not change the latency, so 400 here instead of the 4000 the trained head used.
        "coarse_to_fine (msvq 1-2-4-8-8, K=1024)": CoarseToFineConfig(tokenizer=msvq(
            scales=[1, 2, 4, 8, 8], codebook_size=1024, steps=400)),
        # CARP's per-dimension layout: s * A codes per scale (60 for A=4), still 4 passes.
        "coarse_to_fine (msvq 1-2-4-8, per dimension)": CoarseToFineConfig(tokenizer=msvq(per_dimension=True, steps=400)),
    }


def _count_suffix_passes(policy, obs) -> int:
    """Forward passes after the prefix for one chunk (N=1)."""
    calls = {"n": 0}
    head, backbone = policy.head, policy.backbone
    target = (head, "run_expert") if hasattr(head, "run_expert") else (backbone, "extend")
    orig = getattr(*target)

    def counted(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    setattr(*target, counted)
    try:
        policy.sample_actions(obs, num_samples=1)
    finally:
        delattr(*target)  # drop the instance attribute: the class method is back
    return calls["n"]


def training_chunks(dataset: str | None, horizon: int, action_dim: int) -> np.ndarray:
    if dataset is None:
        return np.random.default_rng(0).standard_normal((4096, horizon, action_dim))
    from vla.data.chunks import chunks_from_dataset

    raw = chunks_from_dataset(dataset, horizon, max_chunks=20000)
    flat = raw.reshape(-1, raw.shape[-1])
    return (raw - flat.mean(0)) / np.maximum(flat.std(0), 1e-6)  # mean_std, as the metaworld preset


def measure(name: str, head_cfg, chunks: np.ndarray, samples: list[int], repeats: int, bf16: bool) -> dict:
    from vla.policy import VLAPolicy
    from vla.presets import get_preset
    from vla.testing import random_observation

    cfg = get_preset("metaworld").policy
    cfg.head = head_cfg
    cfg.max_action_dim = chunks.shape[-1]
    torch.manual_seed(0)
    policy = VLAPolicy(cfg).eval()
    if hasattr(policy.head, "fit_tokenizer"):
        policy.head.fit_tokenizer(chunks)
    obs = random_observation(policy, batch=1, prompts=["pick up the puck"])
    row: dict = {"head": name, "bf16": bf16}
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        row["suffix passes"] = _count_suffix_passes(policy, obs)
        prefix = policy.encode(obs)
        row["prefix ms"] = round(median_ms(lambda: policy.encode(obs), repeats), 1)
        for n in samples:
            row[f"chunk ms N={n}"] = round(median_ms(lambda: policy.sample_actions(obs, num_samples=n), repeats), 1)
            row[f"head ms N={n}"] = round(median_ms(
                lambda: policy.head.sample(policy.backbone, prefix, num_samples=n), repeats), 1)
    row["params (head, M)"] = round(sum(p.numel() for p in policy.head.parameters()) / 1e6, 2)
    return row


def success_rows(evals: list[str]) -> list[dict]:
    """``NAME=PATH[,PATH...]``: one row per head; several results.json of one head (other seeds, later episodes) are pooled."""
    rows = []
    for item in evals:
        name, _, paths = item.partition("=")
        if not paths:
            raise SystemExit(f"--eval: expected NAME=PATH/results.json[,PATH/results.json...], got {item!r}")
        results = [json.loads(Path(p).read_text()) for p in paths.split(",")]
        rows.append({"head": name, "policy": results[0].get("policy"), **pool_evals(results)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="local LeRobot dataset to fit the token heads' tokenizers on")
    p.add_argument("--samples", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="measure under bf16 autocast (as trained)")
    p.add_argument("--eval", action="append", default=[], help="NAME=results.json of `vla eval metaworld` (NAME=A.json,B.json pools runs: other seeds, later episodes)")
    p.add_argument("--skip-latency", action="store_true", help="only read the --eval results (no latency rows)")
    p.add_argument("--out", default="benchmarks/results/heads.json")
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    from vla.plugins import load_plugins

    load_plugins()
    horizon = 8
    rows = []
    if not args.skip_latency:
        chunks = training_chunks(args.dataset, horizon, 4)
        rows = [measure(name, cfg, chunks, args.samples, args.repeats, args.bf16) for name, cfg in head_variants().items()]
        flow = rows[0]
        n_hi = max(args.samples)
        for r in rows:
            r[f"chunk vs flow N={n_hi}"] = round(r[f"chunk ms N={n_hi}"] / flow[f"chunk ms N={n_hi}"], 2)
            r["chunk vs flow N=1"] = round(r["chunk ms N=1"] / flow["chunk ms N=1"], 2)
            r["head vs flow N=1"] = round(r["head ms N=1"] / flow["head ms N=1"], 2)
        print_table(rows, list(dict.fromkeys(k for r in rows for k in r)))
    succ = success_rows(args.eval)
    if succ:
        print()
        print_table(succ, ["head", "success", "ci95", "episodes_per_task", "runs", "policy"])
    out = write_json(Path(args.out), {"latency": rows, "success": succ, "threads": args.threads,
                                      "repeats": args.repeats, **provenance(started)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
