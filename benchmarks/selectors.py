"""Test-time chunk selection: latency per chunk for N candidates per selector, and MT10 success per arm.

    python -m benchmarks.selectors --policy outputs/selectors/policy \\
        --evals outputs/selectors/eval_first_n1 outputs/selectors/eval_cfn_n16 ... [--threads 1] [--repeats 20]

Latency: ``policy.predict_action_chunk(raw, num_samples=N, selector=name)`` on one MetaWorld-shaped
observation (the robot-facing path: preprocessing, one backbone pass, N candidates, scoring,
unnormalization), median of ``--repeats`` after a warm-up, all arms timed round-robin, ``--threads`` torch
threads (1 = what each evaluation worker uses); ``--num-steps 5`` adds every arm at 5 Euler steps (flow heads:
fewer steps per candidate, the saved N=1 stays the baseline). ``--policy.FIELD=VALUE`` overrides the checkpoint's
execution settings for every arm, as in `vla eval` (token heads: ``--policy.head.temperature=1.0
--policy.head.greedy_first=true`` draws the candidates while N=1 stays the greedy chunk). Success: read from
``vla eval metaworld ... --selector NAME --num-samples N`` result folders (each has results.json with its command); all arms must share tasks, episodes
and seed, and each is paired by episode with the baseline (the saved policy at N=1): episodes gained and lost, and
the exact McNemar p.
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

from benchmarks.common import episode_outcomes, paired_comparison, pool_evals, print_table, provenance, write_json


def _raw_observation(policy: Any, seed: int = 0) -> dict:
    pre = policy.preprocessor
    rng = np.random.default_rng(seed)
    s = policy.config.image_size
    raw: dict[str, Any] = {k: rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for k in pre.camera_map}
    raw["observation.state"] = rng.standard_normal(pre.state_dim).astype(np.float32)
    raw["task"] = "open the drawer"
    return raw


def _interleaved_ms(calls: dict[str, Any], repeats: int) -> dict[str, tuple[float, float]]:
    """Median and p90 ms of every call, measured round-robin: each repeat runs every arm once, so a slow
    stretch of this (shared, noisy) machine hits all arms alike and the ratios stay side by side."""
    for fn in calls.values():
        for _ in range(2):
            fn()  # warm-up (allocations, lazy selector loads)
    ts: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    out = {}
    for k, v in ts.items():
        v.sort()
        out[k] = (round(statistics.median(v) * 1000, 2), round(v[int(0.9 * (len(v) - 1))] * 1000, 2))
    return out


def selector_arg(text: str) -> tuple[str, str | dict]:
    """``--selectors`` item -> (row label, selector spec): ``NAME`` (assets saved with the policy) or ``NAME=DIR``
    (``{"type": NAME, "path": DIR}``, e.g. ``gated=outputs/P_gated``)."""
    name, sep, path = text.partition("=")
    if not name or (sep and not path):
        raise ValueError(f"--selectors: expected NAME or NAME=DIR, received {text!r}")
    return name, ({"type": name, "path": path} if sep else name)


def measure_latency(policies: dict[int, Any], selectors: list[str], samples: list[int], repeats: int, bf16: bool,
                    fp32_base: float | None = None) -> list[dict]:
    """Rows: selector, N, Euler steps, median and p90 ms per chunk, and ratios. ``policies``: the checkpoint
    loaded once per ``num_steps`` (``--head.num_steps=K``, the execution override `vla eval` takes); the first
    is the saved setting. ``vs_N1``: against the plain N=1 chunk of the saved setting in the same precision
    (what the policy costs without selection); ``vs_N1_same_steps``: against the plain N=1 at the row's own
    steps; ``vs_fp32_N1`` (bf16 rows, given ``fp32_base``, the fp32 plain N=1 ms): against that.
    bf16 = the policy's own inference mode (``config.inference_bf16``, what `--policy.inference_bf16=true` sets).
    All arms are timed interleaved (``_interleaved_ms``)."""
    first = next(iter(policies.values()))
    raw = _raw_observation(first)
    saved = {k: p.config.inference_bf16 for k, p in policies.items()}
    arms: dict[str, tuple[str, int, int | None]] = {}
    calls: dict[str, Any] = {}
    for steps, policy in policies.items():
        arms[f"none/1/{steps}"] = ("none (plain)", 1, steps)
        calls[f"none/1/{steps}"] = lambda policy=policy: policy.predict_action_chunk(raw)
        for text in selectors:
            name, spec = selector_arg(text)
            for n in samples:
                arms[f"{name}/{n}/{steps}"] = (name, n, steps)
                calls[f"{name}/{n}/{steps}"] = (lambda policy=policy, n=n, spec=spec:
                                                policy.predict_action_chunk(raw, num_samples=n, selector=spec))
    try:
        for p in policies.values():
            p.config.inference_bf16 = bf16
        ms = _interleaved_ms(calls, repeats)
    finally:
        for k, p in policies.items():
            p.config.inference_bf16 = saved[k]
    base_steps = next(iter(policies))
    base = ms[f"none/1/{base_steps}"][0]
    ref = fp32_base if bf16 and fp32_base else base
    rows = []
    for key, (name, n, steps) in arms.items():
        med, p90 = ms[key]
        rows.append({"selector": name, "N": n, "num_steps": steps, "bf16": bf16, "ms_median": med, "ms_p90": p90,
                     "vs_N1": round(med / base, 2), "vs_N1_same_steps": round(med / ms[f"none/1/{steps}"][0], 2),
                     "vs_fp32_N1": round(med / ref, 2)})
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
                     "N": int(runs[0][1].get("num_samples") or 1),
                     "overrides": " ".join(runs[0][1].get("policy_overrides") or []),
                     **pool_evals([r for _, r in runs])})
    keys = {(tuple(r["tasks"]), tuple(r["runs"])) for r in rows}
    if len(keys) > 1:
        raise ValueError(f"evaluations differ in tasks or (seed, first episode, episodes) runs, not comparable: {sorted(keys)}")
    base = baseline_arm(rows)
    if base is not None:  # every arm against the baseline, paired by episode (same variation and seed)
        try:
            outcomes = [episode_outcomes([r for _, r in runs]) for runs in arms.values()]
        except ValueError as e:  # results.json from before per-episode outcomes were written
            print(f"(no paired comparison: {e})")
            return rows
        ref = outcomes[rows.index(base)]
        for row, out in zip(rows, outcomes):
            pc = paired_comparison(ref, out)
            row.update(vs_base_gained=pc["gained"], vs_base_lost=pc["lost"], vs_base_mcnemar_p=pc["mcnemar_p"])
    return rows


def baseline_arm(success: list[dict]) -> dict | None:
    """The policy as saved: an N=1 arm without execution overrides if there is one, else the first N=1 arm."""
    base = sorted((r for r in success if r["N"] == 1), key=lambda r: bool(r.get("overrides")))
    return base[0] if base else None


def targets(success: list[dict], latency: list[dict]) -> dict:
    out: dict[str, Any] = {}
    b = baseline_arm(success)
    n16 = [r for r in success if r["N"] == 16]
    if b is not None and n16:
        best = max(n16, key=lambda r: r["success"])
        # from counts, not from two rounded percentages
        gain = round(100 * (best["successes"] / best["episodes"] - b["successes"] / b["episodes"]), 1)
        out["success"] = {"baseline_N1": b["success"], "baseline_overrides": b.get("overrides", ""),
                          "best_N16": best["selector"], "best_N16_overrides": best.get("overrides", ""),
                          "best_N16_success": best["success"], "gain_points": gain, "target_points": 5.0,
                          "met": gain >= 5.0, **{k: best[k] for k in ("vs_base_gained", "vs_base_lost",
                                                                      "vs_base_mcnemar_p") if k in best}}
    lat = {}
    saved_steps = latency[0].get("num_steps") if latency else None
    for r in latency:
        if r["N"] == 16:
            steps = r.get("num_steps")
            name = f"{r['selector']}{f' {steps} steps' if steps != saved_steps else ''}{' bf16' if r['bf16'] else ''}"
            lat[name] = {"ratio": r["vs_N1"], "met": r["vs_N1"] <= 2.0}
            if steps != saved_steps:  # against N=1 at the same steps too
                lat[f"{name} vs N=1 at {steps} steps"] = {"ratio": r["vs_N1_same_steps"],
                                                          "met": r["vs_N1_same_steps"] <= 2.0}
            if r["bf16"] and "vs_fp32_N1" in r:  # N=16 in bf16 against the fastest N=1 (fp32)
                lat[f"{name} vs fp32 N=1"] = {"ratio": r["vs_fp32_N1"], "met": r["vs_fp32_N1"] <= 2.0}
    out["latency_N16_vs_N1"] = lat
    return out


def main(argv: list[str] | None = None) -> int:
    from vla.config import parse_args_with_overrides

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --policy.FIELD=VALUE overrides the checkpoint's execution settings "
                                       "(every arm), as in `vla eval metaworld`.")
    p.add_argument("--policy", required=True, help="checkpoint (with selector/ for cfn, selector/value/ for value)")
    p.add_argument("--evals", nargs="*", default=[], help="`vla eval metaworld` output folders; several of one arm (other seeds, later episodes) are pooled")
    p.add_argument("--selectors", nargs="+", default=["first", "consistency", "cfn"],
                   help="NAME (assets saved with the policy) or NAME=DIR (--selector.path), e.g. gated=DIR")
    p.add_argument("--samples", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (evaluation workers use 1)")
    p.add_argument("--num-steps", nargs="*", type=int, default=[],
                   help="also measure every arm with these Euler steps (--head.num_steps=K, flow heads); "
                        "the saved setting is always measured and is the N=1 baseline")
    p.add_argument("--bf16", action="store_true",
                   help="also measure the policy's bf16 inference mode (config.inference_bf16: autocast)")
    p.add_argument("--out", default="benchmarks/results/selectors.json")
    p.add_argument("--reuse-latency", action="store_true",
                   help="keep the latency rows (and their provenance) already in --out; only re-read the evals")
    args, overrides = parse_args_with_overrides(p, argv)
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
        policy = VLAPolicy.from_pretrained(args.policy, overrides=overrides)
        policies = {getattr(policy.config.head, "num_steps", None): policy}
        for k in args.num_steps:
            if k not in policies:
                policies[k] = VLAPolicy.from_pretrained(args.policy, overrides=[*overrides, f"--head.num_steps={k}"])
        latency = measure_latency(policies, args.selectors, args.samples, args.repeats, bf16=False)
        if args.bf16:
            latency += measure_latency(policies, args.selectors, args.samples, args.repeats, bf16=True,
                                       fp32_base=latency[0]["ms_median"])
        latency_run = {**provenance(started), "threads": args.threads, "repeats": args.repeats,
                       "policy_overrides": overrides}
    print("latency per chunk (predict_action_chunk, batch 1):")
    print_table(latency, ["selector", "N", "num_steps", "bf16", "ms_median", "ms_p90", "vs_N1", "vs_N1_same_steps",
                          "vs_fp32_N1"])
    success = collect_evals([Path(f) for f in args.evals]) if args.evals else []
    if success:
        print("\nMetaWorld MT10 closed-loop success:")
        print_table(success, ["arm", "selector", "N", "overrides", "success", "ci95", "vs_base_gained", "vs_base_lost",
                              "vs_base_mcnemar_p", "in_loop_ms_per_chunk", "wall_s"])
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
