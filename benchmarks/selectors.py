"""Test-time chunk selection: latency per chunk for N candidates per selector, and MT10 success per arm.

    python -m benchmarks.selectors --policy outputs/selectors/policy \\
        --evals outputs/selectors/eval_first_n1 outputs/selectors/eval_cfn_n16 ... [--threads 1] [--repeats 20]

Latency: ``policy.predict_action_chunk(raw, num_samples=N, selector=name)`` on one MetaWorld-shaped
observation (the robot-facing path: preprocessing, one backbone pass, N candidates, scoring,
unnormalization), median of ``--repeats`` after a warm-up, ``--threads`` torch threads (1 = what each
evaluation worker uses). Success: read from ``vla eval metaworld ... --selector NAME --num-samples N``
result folders (each has results.json with its command); all arms must share tasks, episodes and seed.
Prints tables and writes benchmarks/results/selectors.json. Targets (issue 7): the best selector at
N=16 adds >= 5 points over N=1; N=16 costs <= 2x the latency of N=1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import pool_evals, print_table, provenance, write_json


def _raw_observation(policy: Any, seed: int = 0) -> dict:
    pre = policy.preprocessor
    rng = np.random.default_rng(seed)
    s = policy.config.image_size
    raw: dict[str, Any] = {k: rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for k in pre.camera_map}
    raw["observation.state"] = rng.standard_normal(pre.state_dim).astype(np.float32)
    raw["task"] = "open the drawer"
    return raw


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    for _ in range(2):
        fn()  # warm-up (allocations, lazy CFN load)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return round(statistics.median(ts) * 1000, 2), round(ts[int(0.9 * (len(ts) - 1))] * 1000, 2)


def measure_latency(policy: Any, selectors: list[str], samples: list[int], repeats: int, bf16: bool,
                    fp32_base: float | None = None) -> list[dict]:
    """Rows: selector, N, median and p90 ms per chunk, ratio to the plain N=1 chunk of the same precision
    (``vs_N1``) and, for bf16 rows given ``fp32_base`` (the fp32 plain N=1 ms), to that (``vs_fp32_N1``).
    bf16 = the policy's own inference mode (``config.inference_bf16``, what `--policy.inference_bf16=true` sets)."""
    raw = _raw_observation(policy)
    saved = policy.config.inference_bf16
    policy.config.inference_bf16 = bf16
    rows = []
    try:
        base, base_p90 = _median_ms(lambda: policy.predict_action_chunk(raw), repeats)
        ref = fp32_base if bf16 and fp32_base else base
        rows.append({"selector": "none (plain)", "N": 1, "bf16": bf16, "ms_median": base, "ms_p90": base_p90,
                     "vs_N1": 1.0, "vs_fp32_N1": round(base / ref, 2)})
        for name in selectors:
            for n in samples:
                med, p90 = _median_ms(lambda n=n, name=name: policy.predict_action_chunk(raw, num_samples=n, selector=name),
                                      repeats)
                rows.append({"selector": name, "N": n, "bf16": bf16, "ms_median": med, "ms_p90": p90,
                             "vs_N1": round(med / base, 2), "vs_fp32_N1": round(med / ref, 2)})
    finally:
        policy.config.inference_bf16 = saved
    return rows


def collect_evals(folders: list[Path]) -> list[dict]:
    """One row per arm (selector, N, overrides). Several folders of one arm (``--seed 0`` and ``--seed 1`` runs,
    or later episodes with ``--first-episode``) are pooled (``pool_evals``). Every arm must have run the same
    tasks on the same (seed, first episode, episodes per task) runs, so arms stay comparable."""
    arms: dict[tuple, list[tuple[Path, dict]]] = {}
    for f in folders:
        r = json.loads((Path(f) / "results.json").read_text())
        # an arm = everything pool_evals requires to agree; its folders (seeds) are pooled
        key = json.dumps([r.get("policy"), r.get("selector"), int(r.get("num_samples") or 1),
                          r.get("policy_overrides") or []], sort_keys=True)
        arms.setdefault(key, []).append((Path(f), r))
    rows = []
    for runs in arms.values():
        sel = runs[0][1].get("selector")
        rows.append({"arm": "+".join(f.name for f, _ in runs),
                     "selector": (sel.get("type") if isinstance(sel, dict) else sel) or "none",
                     "N": int(runs[0][1].get("num_samples") or 1), **pool_evals([r for _, r in runs])})
    keys = {(tuple(r["tasks"]), tuple(r["runs"])) for r in rows}
    if len(keys) > 1:
        raise ValueError(f"evaluations differ in tasks or (seed, first episode, episodes) runs, not comparable: {sorted(keys)}")
    return rows


def targets(success: list[dict], latency: list[dict]) -> dict:
    out: dict[str, Any] = {}
    base = [r for r in success if r["N"] == 1]
    n16 = [r for r in success if r["N"] == 16]
    if base and n16:
        b = base[0]["success"]
        best = max(n16, key=lambda r: r["success"])
        # from counts, not from two rounded percentages
        gain = round(100 * (best["successes"] / best["episodes"] - base[0]["successes"] / base[0]["episodes"]), 1)
        out["success"] = {"baseline_N1": b, "best_N16": best["selector"], "best_N16_success": best["success"],
                          "gain_points": gain, "target_points": 5.0, "met": gain >= 5.0}
    lat = {}
    for r in latency:
        if r["N"] == 16:
            lat[f"{r['selector']}{' bf16' if r['bf16'] else ''}"] = {"ratio": r["vs_N1"], "met": r["vs_N1"] <= 2.0}
            if r["bf16"] and "vs_fp32_N1" in r:  # N=16 in bf16 against the fastest N=1 (fp32)
                lat[f"{r['selector']} bf16 vs fp32 N=1"] = {"ratio": r["vs_fp32_N1"], "met": r["vs_fp32_N1"] <= 2.0}
    out["latency_N16_vs_N1"] = lat
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="checkpoint (with selector/ for cfn, selector/value/ for value)")
    p.add_argument("--evals", nargs="*", default=[], help="`vla eval metaworld` output folders; several of one arm (other seeds, later episodes) are pooled")
    p.add_argument("--selectors", nargs="+", default=["first", "consistency", "cfn"])
    p.add_argument("--samples", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (evaluation workers use 1)")
    p.add_argument("--bf16", action="store_true",
                   help="also measure the policy's bf16 inference mode (config.inference_bf16: autocast)")
    p.add_argument("--out", default="benchmarks/results/selectors.json")
    p.add_argument("--reuse-latency", action="store_true",
                   help="keep the latency rows (and their provenance) already in --out; only re-read the evals")
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    from vla.policy import VLAPolicy

    if args.reuse_latency and not Path(args.out).is_file():
        p.error(f"--reuse-latency: no earlier results at --out {args.out} to take the latency rows from")
    previous = json.loads(Path(args.out).read_text()) if args.reuse_latency else None
    if previous is not None:
        latency, latency_run = previous["latency"], previous.get("latency_run") or {
            k: previous.get(k) for k in ("command", "commit", "machine", "date", "threads", "repeats")}
    else:
        policy = VLAPolicy.from_pretrained(args.policy)
        latency = measure_latency(policy, args.selectors, args.samples, args.repeats, bf16=False)
        if args.bf16:
            latency += measure_latency(policy, args.selectors, args.samples, args.repeats, bf16=True,
                                       fp32_base=latency[0]["ms_median"])
        latency_run = {**provenance(started), "threads": args.threads, "repeats": args.repeats}
    print("latency per chunk (predict_action_chunk, batch 1):")
    print_table(latency, ["selector", "N", "bf16", "ms_median", "ms_p90", "vs_N1", "vs_fp32_N1"])
    success = collect_evals([Path(f) for f in args.evals]) if args.evals else []
    if success:
        print("\nMetaWorld MT10 closed-loop success:")
        print_table(success, ["arm", "selector", "N", "success", "ci95", "in_loop_ms_per_chunk", "wall_s"])
    summary = targets(success, latency)
    print("\ntargets:", json.dumps(summary))
    fit = Path(args.policy) / "selector" / "cfn_config.json"
    value_fit = Path(args.policy) / "selector" / "value" / "value_config.json"
    dagger_fit = Path(args.policy) / "selector" / "dagger" / "value_config.json"
    out = write_json(Path(args.out), {
        "policy": args.policy, "threads": args.threads, "repeats": args.repeats, "latency": latency,
        "latency_run": latency_run,
        "success": success, "targets": summary,
        "cfn_fit": json.loads(fit.read_text()).get("fit") if fit.is_file() else None,
        "value_fit": json.loads(value_fit.read_text()).get("fit") if value_fit.is_file() else None,
        "dagger_fit": json.loads(dagger_fit.read_text()).get("fit") if dagger_fit.is_file() else None,
        **provenance(started)})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
