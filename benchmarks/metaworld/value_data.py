"""Outcomes of a policy's candidate chunks, from the simulator: the training data of the ``value`` selector.

    python -m benchmarks.metaworld.value_data --policy P --tasks mt10 --episodes 10 --samples 16 \\
        --stride 2 --seed 0 --workers 2 --out outputs/value_data.pt
    vla post-train value --policy P --data outputs/value_data.pt          # -> P/selector/value/

The policy plays TRAINING variations (the pools `vla eval metaworld` never uses) with one candidate, as
it would without selection (``--selector S``: with S's choice among ``--samples`` candidates, DAgger's next
round — the states the selecting policy itself visits). Every ``--stride``-th re-plan the MuJoCo + MetaWorld state is saved, the
policy samples ``--samples`` candidates from one backbone pass (``VLAPolicy.sample_candidates``), and
each candidate is rolled from the saved state (``chunk_outcome.py``, no rendering): the sum of
MetaWorld's dense rewards over the chunk is that candidate's outcome. The scripted expert's own next
chunk from the same state is recorded too (``expert_chunk``, normalized like the candidates: the DAgger
label of the ``dagger`` selector), and each candidate's negated mean squared distance to it (``expert``,
raw actions clipped to [-1, 1]). The episode then goes on with the first candidate.
Saved per state: the head's features pooled over the action tokens (N, W), the observation summary
(C,), the normalized candidates (N, H, A), their returns, last-step rewards, expert scores and
successes, and the task/episode (``vla post-train value|dagger`` hold out whole episodes).
``--no-rollouts`` skips rolling the candidates (no returns: enough for ``vla post-train dagger`` and
``vla post-train value --target expert``). ``--policy.FIELD=VALUE`` overrides the checkpoint's execution
settings as in `vla eval` (e.g. ``--policy.head.num_steps=5``: a selector fitted on candidates sampled
the way they will be sampled when it selects).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np


def collect_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training variation (in a worker): the policy's episode, with candidate outcomes every stride."""
    import torch

    from benchmarks.metaworld.chunk_outcome import chunk_outcomes, expert_chunk, expert_closeness, play
    from benchmarks.metaworld.evaluate import _policy, _seed_everything
    from benchmarks.metaworld.expert_policy import ScriptedExpertPolicy
    from benchmarks.metaworld.workers import get_env

    policy = _policy()
    expert = ScriptedExpertPolicy()
    env = get_env(job["task"], job["cameras"], job["image_size"])
    env.set_variation(job["variation"])
    _seed_everything(job["episode_seed"])
    g = torch.Generator().manual_seed(job["episode_seed"])
    policy.reset()
    obs = env.reset()
    n_exec = int(policy.config.n_action_steps)
    records: list[dict[str, Any]] = []
    steps, chunk_i, success = 0, 0, False
    while steps < job["max_steps"]:
        save = chunk_i % job["stride"] == 0
        select = job.get("selector")  # DAgger's next round: the selecting policy's own states
        out = policy.sample_candidates(obs, job["samples"] if save or select else 1, generator=g, selector=select)
        actions = out["actions"][0].cpu().numpy()  # (N, H, 4) raw
        run = int(out["scores"][0].argmax()) if select else 0  # the candidate the episode goes on with
        if save:
            a = actions.shape[-1]
            # What the scripted expert (the demonstrations' source) would do from this very state: a
            # DAgger-style label that, unlike a few steps of dense reward, exists for every task and state.
            ref = np.clip(expert_chunk(env, expert, obs, actions.shape[1]), -1.0, 1.0)
            rec = {
                "features": out["features"][0].float().mean(-2).cpu().numpy().astype(np.float32),  # (N, W)
                "summary": out["summary"][0].float().cpu().numpy().astype(np.float32),  # (C,)
                "candidates": out["normalized"][0, ..., :a].float().cpu().numpy().astype(np.float32),  # (N, H, A)
                "expert": expert_closeness(env, expert, obs, actions, ref),
                "expert_chunk": policy.normalize_actions(ref)[0, :, :a].cpu().numpy().astype(np.float32),
                "step": steps}
            if job.get("rollouts", True):
                outs = chunk_outcomes(env, actions)
                rec.update(returns=np.array([o["return"] for o in outs], np.float32),
                           final_reward=np.array([o["final_reward"] for o in outs], np.float32),
                           success=np.array([o["success"] for o in outs]))
            records.append(rec)
        chunk_i += 1
        # on with the first candidate (the states a 1-candidate policy visits), or the selector's choice
        obs, success, n, done = play(env, actions[run][:n_exec])
        steps += n
        if done:
            break
    return {"task": job["task"], "episode": job["episode"], "success": bool(success), "records": records}


def stack_records(results: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Per-episode results -> one dict of stacked tensors (M states); ``episode`` ids are global."""
    import torch

    rows = [(ti, ei, r) for ei, res in enumerate(results) for ti in [tasks.index(res["task"])] for r in res["records"]]
    if not rows:
        raise ValueError("value_data: no states were recorded (episodes too short for --stride?)")

    def stack(key: str, dtype=None) -> torch.Tensor:
        return torch.as_tensor(np.stack([r[key] for _, _, r in rows]), dtype=dtype)

    out = {"features": stack("features"), "summary": stack("summary"), "candidates": stack("candidates"),
           "expert": stack("expert"), "expert_chunk": stack("expert_chunk"),
           "step": torch.tensor([r["step"] for _, _, r in rows]),
           "task": torch.tensor([t for t, _, _ in rows]), "episode": torch.tensor([e for _, e, _ in rows])}
    if "returns" in rows[0][2]:  # collected with rollouts
        out.update(returns=stack("returns"), final_reward=stack("final_reward"), success=stack("success", torch.bool))
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.common import provenance
    from benchmarks.metaworld.evaluate import selector_spec, _set_policy_spec, policy_cameras, pop_selector_fields
    from benchmarks.metaworld.tasks import resolve_tasks, variations
    from benchmarks.metaworld.workers import run_jobs
    from policies.selectors.value import sampling_settings
    from vla.config import parse_args_with_overrides
    from vla.policy import load_policy_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Any --policy.FIELD=VALUE overrides the checkpoint's execution settings, as in "
                                       "`vla eval` (e.g. --policy.head.num_steps=5).")
    p.add_argument("--policy", required=True, help="policy checkpoint (pretrained_model/)")
    p.add_argument("--tasks", default="mt10")
    p.add_argument("--episodes", type=int, default=10, help="training variations per task")
    p.add_argument("--samples", type=int, default=16, help="candidates per saved state")
    p.add_argument("--stride", type=int, default=2, help="save every N-th re-plan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--no-rollouts", dest="rollouts", action="store_false",
                   help="do not roll the candidates (no returns): expert labels only, for `vla post-train dagger`")
    p.add_argument("--selector", default=None,
                   help="play the episodes with this selector's choice among --samples candidates instead of the first "
                        "(DAgger's next round: label the states the selecting policy visits), e.g. dagger")
    p.add_argument("--selector.path", dest="selector_path", default=None, help="its assets (default: saved with the policy)")
    p.add_argument("--out", type=Path, required=True, help="a .pt file")
    p.add_argument("--no-progress", action="store_true")
    argv, fields = pop_selector_fields(sys.argv[1:] if argv is None else argv)  # --selector.FIELD=VALUE
    args, overrides = parse_args_with_overrides(p, argv)
    try:
        # fail here, not in every worker (a LoRA adapter folder has no config.json of its own to override)
        config = load_policy_config(args.policy, overrides) if overrides or (Path(args.policy) / "config.json").is_file() \
            else None
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    for name in ("episodes", "samples", "stride", "workers", "max_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected >= 1, received {getattr(args, name)}")
    started = time.time()
    tasks = resolve_tasks(args.tasks)
    cams = policy_cameras(args.policy)
    selector = selector_spec(args, fields)  # None, a name, or {"type", "path"?, FIELD: VALUE...}
    jobs = []
    for task in tasks:
        for i, (_, _, var) in enumerate(variations(task, "train", args.episodes, args.seed)):
            seed = int(np.random.SeedSequence([args.seed, zlib.crc32(task.encode()), i, 17]).generate_state(1)[0])
            jobs.append(dict(task=task, episode=i, variation=var, cameras=cams, image_size=args.image_size,
                             samples=args.samples, stride=args.stride, max_steps=args.max_steps, episode_seed=seed,
                             rollouts=args.rollouts, selector=selector))
    with contextlib.closing(run_jobs(collect_job, jobs, args.workers, "episodes", not args.no_progress,
                                     _set_policy_spec, (args.policy, "cpu", None, overrides))) as it:
        results = list(it)
    data = stack_records(results, tasks)
    data["meta"] = {"policy": str(args.policy), "tasks": tasks, "episodes_per_task": args.episodes,
                    "samples": args.samples, "stride": args.stride, "seed": args.seed, "split": "train",
                    "rollouts": args.rollouts, "selector": selector, "policy_overrides": overrides,
                    # how the candidates were sampled: a selector fitted on them warns when used otherwise
                    "num_steps": getattr(getattr(config, "head", None), "num_steps", None),
                    "sampling": sampling_settings(getattr(config, "head", None)),
                    "policy_success": float(np.mean([r["success"] for r in results])),
                    "provenance": provenance(started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, args.out)
    r = data.get("returns", data["expert"])
    spread = (r.max(1).values - r.min(1).values).mean()
    print(f"value_data: {len(r)} states from {len(results)} episodes ({len(tasks)} tasks), {args.samples} candidates "
          f"each; mean within-state {'return' if args.rollouts else 'expert-closeness'} spread {float(spread):.3f}; "
          f"policy success on these variations "
          f"{data['meta']['policy_success']:.0%}; {time.time() - started:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
