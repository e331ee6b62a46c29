"""Does the world-model reward rank chunks like the simulator does? Spearman correlation on MetaWorld.

    python -m benchmarks.post_training_wm_correlation --policy POLICY \\
        --world_model outputs/post_training/wm/checkpoints/last/world_model --tasks mt10 --episodes 2 \\
        --states 4 --samples 8 --seed 7

In spawned simulator workers: the scripted expert plays the variation once (its final frame is the goal
image, as NORA-1.5 uses demonstrations' goals); then the policy plays it, and at ``--states`` points of
the episode the MuJoCo + MetaWorld state is saved, K chunks are sampled from the policy, and each is rolled
from the saved state (``chunk_outcome.py``): the sum of MetaWorld's dense rewards over the chunk is the
ground truth. The expert's own next chunk from that state is the action-deviation reference.
In this process: the world model scores the K chunks (goal progress to the goal image's latent, and to
its own predicted goal), the deviation from the expert's chunk, and the weighted mix the preference
builder uses; each is compared with the ground truth by Spearman's rank correlation WITHIN each state
(what picking a preference pair needs), then averaged over states. Evaluation seeds: use one that the
DPO comparison does not (the default 7; `vla eval` uses 0).
"""
from __future__ import annotations

import argparse
import contextlib
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import print_table, provenance, write_json


def collect_job(job: dict[str, Any]) -> dict[str, Any]:
    """One variation (in a worker): goal frame by the expert, then policy states with K chunk outcomes."""
    from benchmarks.metaworld.chunk_outcome import chunk_outcomes, expert_chunk
    from benchmarks.metaworld.evaluate import _policy, _seed_everything
    from benchmarks.metaworld.expert_policy import ScriptedExpertPolicy
    from benchmarks.metaworld.workers import get_env

    policy = _policy()
    env = get_env(job["task"], job["cameras"], job["image_size"])
    env.set_variation(job["variation"])
    expert = ScriptedExpertPolicy()
    obs, goal, success = env.reset(), None, False
    for _ in range(job["max_steps"]):
        obs, success, truncated = env.step(expert.predict_action_chunk(obs)[0])
        if success or truncated:
            break
    goal, expert_ok = _strip(obs), success
    _seed_everything(job["episode_seed"])
    policy.reset()
    obs = env.reset()
    h = policy.config.chunk_size
    n_exec = int(policy.config.n_action_steps)
    records, steps, chunk_i = [], 0, 0
    while steps < job["max_steps"] and len(records) < job["states"]:
        save = chunk_i % job["stride"] == job["stride"] - 1
        cands = np.asarray(policy.predict_action_chunk(obs, num_samples=job["samples"] if save else 2))  # (K, H, 4)
        if save:
            outs = chunk_outcomes(env, cands)
            records.append({"obs": _strip(obs), "chunks": cands.astype(np.float32),
                            "expert": expert_chunk(env, expert, obs, h),
                            "return": np.array([o["return"] for o in outs], np.float32),
                            "success": np.array([o["success"] for o in outs])})
        chunk_i += 1
        done = False
        for a in cands[0][:n_exec]:  # the episode goes on with the first sample (on-policy states)
            obs, success, truncated = env.step(a)
            steps += 1
            if success or truncated:
                done = True
                break
        if done:
            break
    return {"task": job["task"], "episode": job["episode"], "goal": goal, "expert_success": bool(expert_ok),
            "records": records}


def _strip(obs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obs.items() if k != "observation.environment_state"}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation; NaN when either side is constant (such states are skipped)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def score_records(results: list[dict], wm, weights: dict[str, float]) -> list[dict]:
    """World-model / deviation / mixed scores of every state's K chunks -> per-state rows."""
    import torch

    from post_training.rewards import action_deviation, combine

    pre = wm.encoder.preprocessor
    amax = wm.cfg.action_dim

    def norm(chunks: np.ndarray) -> torch.Tensor:
        t = pre.normalizer.normalize(pre.action_key, torch.as_tensor(chunks, dtype=torch.float32))
        out = torch.zeros(*t.shape[:-1], amax)
        out[..., : t.shape[-1]] = t
        return out

    rows = []
    for res in results:
        if not res["records"]:
            continue
        goal_z = wm.encode(pre.observation(res["goal"]))
        for rec in res["records"]:
            z = wm.encode(pre.observation(rec["obs"]))
            c = norm(rec["chunks"])[None]  # (1, K, H, A)
            with torch.no_grad():
                gp = wm.reward(z, c, goal_z)[0].numpy()
                gp_pred = wm.reward(z, c, None)[0].numpy()
            dev = action_deviation(c, norm(rec["expert"])[None])[0].numpy()
            comps = {"goal_progress": torch.as_tensor(gp)[None], "action": torch.as_tensor(-dev)[None]}
            rows.append({"task": res["task"], "truth": rec["return"], "goal_progress": gp,
                         "goal_progress_predicted_goal": gp_pred, "action": -dev, "comps": comps})
    # The mix uses the spreads over all states, as the preference builder does.
    from post_training.rewards import within_scale

    scales = {k: within_scale(torch.cat([r["comps"][k] for r in rows])) for k in ("goal_progress", "action")}
    for r in rows:
        r["mixed"] = combine(r["comps"], weights, scales)[0].numpy()
    return rows


def summarize(rows: list[dict]) -> dict[str, Any]:
    preds = ("goal_progress", "goal_progress_predicted_goal", "action", "mixed")
    out: dict[str, Any] = {"states": len(rows), "per_predictor": {}, "per_task": {}}
    for p in preds:
        vals = np.array([spearman(r[p], r["truth"]) for r in rows])
        ok = vals[~np.isnan(vals)]
        out["per_predictor"][p] = {"mean_spearman": float(ok.mean()) if len(ok) else None,
                                   "states_used": len(ok),
                                   "stderr": float(ok.std(ddof=1) / np.sqrt(len(ok))) if len(ok) > 1 else None,
                                   "top1_regret": float(np.mean([r["truth"].max() - r["truth"][np.argmax(r[p])]
                                                                 for r in rows]))}
    for task in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == task]
        out["per_task"][task] = {p: float(np.nanmean([spearman(r[p], r["truth"]) for r in sub]))
                                 if any(np.ptp(r["truth"]) > 0 for r in sub) else None for p in preds}
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.metaworld.evaluate import _set_policy_spec, policy_cameras
    from benchmarks.metaworld.tasks import resolve_tasks, variations
    from benchmarks.metaworld.workers import run_jobs
    from post_training.rewards import parse_weights
    from post_training.world_model import WorldModel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True)
    p.add_argument("--world_model", required=True)
    p.add_argument("--tasks", default="mt10")
    p.add_argument("--episodes", type=int, default=2, help="variations per task")
    p.add_argument("--states", type=int, default=4, help="saved states per episode")
    p.add_argument("--stride", type=int, default=3, help="save a state every N policy chunks")
    p.add_argument("--samples", type=int, default=8, help="K chunks per state")
    p.add_argument("--weights", default="goal_progress=1,action=1")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results/post_training_wm_correlation.json")
    args = p.parse_args(argv)
    started = time.time()
    cams = policy_cameras(args.policy)
    jobs = []
    for task in resolve_tasks(args.tasks):
        for i, (_, _, var) in enumerate(variations(task, "eval", args.episodes, args.seed)):
            seed = int(np.random.SeedSequence([args.seed, zlib.crc32(task.encode()), i]).generate_state(1)[0])
            jobs.append(dict(task=task, episode=i, variation=var, cameras=cams, image_size=128, states=args.states,
                             stride=args.stride, samples=args.samples, max_steps=args.max_steps, episode_seed=seed))
    with contextlib.closing(run_jobs(collect_job, jobs, args.workers, "states", True, _set_policy_spec,
                                     (args.policy, "cpu"))) as it:
        results = list(it)
    torch.set_num_threads(2)
    wm = WorldModel.from_pretrained(args.world_model)
    rows = score_records(results, wm, parse_weights(args.weights))
    summary = summarize(rows)
    table = [{"predictor": k, "mean Spearman": f"{v['mean_spearman']:.3f}" if v["mean_spearman"] is not None else "-",
              "+-": f"{v['stderr']:.3f}" if v["stderr"] else "-", "states": v["states_used"],
              "top-1 regret": f"{v['top1_regret']:.2f}"} for k, v in summary["per_predictor"].items()]
    print_table(table, ["predictor", "mean Spearman", "+-", "states", "top-1 regret"])
    data = {"benchmark": "world-model reward vs. MetaWorld chunk return (Spearman within a state)",
            "policy": args.policy, "world_model": args.world_model, "samples": args.samples,
            "episodes_per_task": args.episodes, "states_per_episode": args.states, "seed": args.seed,
            "weights": args.weights, **summary, "provenance": provenance(started)}
    path = write_json(Path(args.out), data)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
