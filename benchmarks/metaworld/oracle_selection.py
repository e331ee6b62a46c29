"""How much could selecting among N candidates gain at all? The simulator itself picks the candidate.

    python -m benchmarks.metaworld.oracle_selection --policy P --tasks mt10 --episodes 10 --seed 0 \\
        --samples 16 --by returns --out benchmarks/results/oracle_selection_returns.json

Not a deployable selector: an upper bound for the learned ones. The policy plays the same evaluation
episodes as ``vla eval metaworld --seed S`` (same variations, same episode seeds); at every re-plan it
samples ``--samples`` candidates from one backbone pass and the simulator chooses, from the saved
MuJoCo + MetaWorld state: ``returns`` = the candidate whose chunk earns the most dense reward
(``chunk_outcome.py``; ties go to the first candidate, as if nothing were selected), ``expert`` = the
candidate closest to the scripted expert's own chunk from that state. These are the two targets the
``value`` critic learns (``benchmarks/metaworld/value_data.py``), so the oracle's success bounds what a
perfect critic of that target would reach.
"""
from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

CRITERIA = ("returns", "expert")


def oracle_episode(job: dict[str, Any]) -> dict[str, Any]:
    """One evaluation episode (in a worker) where the simulator picks each executed chunk."""
    from benchmarks.metaworld.chunk_outcome import chunk_outcomes, expert_closeness, play
    from benchmarks.metaworld.evaluate import _policy, _seed_everything
    from benchmarks.metaworld.expert_policy import ScriptedExpertPolicy
    from benchmarks.metaworld.workers import get_env

    policy = _policy()
    expert = ScriptedExpertPolicy()
    env = get_env(job["task"], job["cameras"], job["image_size"])
    env.set_variation(job["variation"])
    _seed_everything(job["episode_seed"])
    n_exec = int(policy.config.n_action_steps)
    policy.reset()
    obs = env.reset()
    steps, chunks, picked_first, success = 0, 0, 0, False
    while steps < job["max_steps"]:
        actions = policy.sample_candidates(obs, job["samples"])["actions"][0].numpy()  # (N, H, 4)
        if job["by"] == "returns":
            score = np.array([o["return"] for o in chunk_outcomes(env, actions)])
        else:
            score = expert_closeness(env, expert, obs, actions)
        k = int(np.argmax(score))  # the first of the best: with equal outcomes, no selection
        picked_first += k == 0
        chunks += 1
        obs, success, n, done = play(env, actions[k][:n_exec])
        steps += n
        if done:
            break
    return {"task": job["task"], "episode": job["episode"], "success": bool(success), "length": steps,
            "chunks": chunks, "picked_first": picked_first}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import print_table, provenance, write_json
    from benchmarks.metaworld.evaluate import _set_policy_spec, episode_plan, policy_cameras, wilson_interval
    from benchmarks.metaworld.tasks import resolve_tasks
    from benchmarks.metaworld.workers import run_jobs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--tasks", default="mt10")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--first-episode", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="the evaluation seed (same episodes as vla eval --seed)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--by", default="returns", choices=CRITERIA)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("episodes", "samples", "workers", "max_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected >= 1, received {getattr(args, name)}")
    started = time.time()
    tasks = resolve_tasks(args.tasks)
    cams = policy_cameras(args.policy)
    jobs = [dict(task=t, episode=i, variation=var, episode_seed=s, cameras=cams, image_size=args.image_size,
                 max_steps=args.max_steps, samples=args.samples, by=args.by)
            for t in tasks for i, _, _, var, s in episode_plan(t, args.seed, args.first_episode, args.episodes)]
    with contextlib.closing(run_jobs(oracle_episode, jobs, args.workers, "episodes", not args.no_progress,
                                     _set_policy_spec, (args.policy, "cpu"))) as it:
        episodes = list(it)
    rows, per_task = [], {}
    for t in tasks:
        eps = [e for e in episodes if e["task"] == t]
        k = sum(e["success"] for e in eps)
        per_task[t] = {"successes": k, "episodes": len(eps), "success_rate": k / len(eps),
                       "picked_first": sum(e["picked_first"] for e in eps) / max(sum(e["chunks"] for e in eps), 1)}
        rows.append({"task": t, "success": f"{100 * k / len(eps):.0f}",
                     "first chosen": f"{per_task[t]['picked_first']:.2f}"})
    total = sum(v["successes"] for v in per_task.values())
    n = sum(v["episodes"] for v in per_task.values())
    rows.append({"task": "MT10" if len(tasks) == 10 else "all", "success": f"{100 * total / n:.1f}", "first chosen": ""})
    print_table(rows, ["task", "success", "first chosen"])
    write_json(args.out, {"benchmark": "oracle chunk selection (simulator picks; an upper bound, not a selector)",
                          "policy": args.policy, "by": args.by, "samples": args.samples, "seed": args.seed,
                          "first_episode": args.first_episode, "episodes_per_task": args.episodes,
                          "mean_success": total / n, "ci95": [round(x, 4) for x in wilson_interval(total, n)],
                          "tasks": per_task, **provenance(started)})
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
