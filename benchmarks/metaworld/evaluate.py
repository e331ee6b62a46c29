"""Closed-loop success rate of a policy on MetaWorld, on variations never used for training.

    vla eval metaworld --policy PATH --tasks mt10 --episodes 10 --out outputs/eval_mt10

A policy is anything with `reset()`, `predict_action_chunk(raw_obs) -> (H, 4)` unnormalized actions
and optionally `config.n_action_steps`; `raw_obs` has the dataset's LeRobot keys (env.py). It is given
as a checkpoint path (`vla.policy.VLAPolicy.from_pretrained(path, device="cpu")`, loaded once in
each worker process) or as a picklable factory that returns such an object (tests, the expert).

Each episode: reset the policy, then repeatedly ask for a chunk, check it (shape (H, 4), H >= the
steps to execute, finite), and execute its first `n_action_steps` actions (clipped to [-1, 1], as
MetaWorld does) until success or `max_steps`. Success is MetaWorld's `info["success"]`, at any step.
Evaluation variations come from odd-seeded pools (tasks.py), so they never appear in training data;
the policy's own randomness (torch, numpy) is seeded per episode, so a run is reproducible.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import numbers
import random
import re
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from policies.broker import accepts_keyword
from vla.data.dataset import IMAGE_PREFIX

from .env import ACTION_DIM, DEFAULT_CAMERA, check_cameras
from .report import command_line
from .tasks import resolve_tasks, variations
from .workers import get_env, run_jobs

DEFAULT_MAX_STEPS = 500  # MetaWorld's own episode limit (LeRobot's wrapper uses 400)
VIDEO_FPS = 30  # MetaWorld acts at 80 Hz: videos play ~2.7x slower than real time, easier to follow


class PolicyOutputError(ValueError):
    """A policy returned an action chunk that cannot be executed (wrong shape, NaN or inf)."""


_POLICY: dict[str, Any] = {}  # the policy of this worker process, built on its first episode


def _set_policy_spec(spec: str | Callable[[], Any], device: str, predict_kwargs: dict | None = None,
                     overrides: Sequence[str] = ()) -> None:
    _POLICY.clear()
    # predict_kwargs: test-time selection, {"num_samples": N, "selector": name or config map} (docs/selectors.md)
    # overrides: `--field=value` over a checkpoint's config (VLAPolicy.from_pretrained)
    _POLICY.update(spec=spec, device=device, kwargs=dict(predict_kwargs or {}), overrides=list(overrides))


def _policy() -> Any:
    if "policy" not in _POLICY:
        spec = _POLICY["spec"]
        if isinstance(spec, (str, Path)):
            import torch

            torch.set_num_threads(1)
            from vla.policy import VLAPolicy

            _POLICY["policy"] = VLAPolicy.from_pretrained(str(spec), device=_POLICY["device"],
                                                          overrides=_POLICY["overrides"])
        else:
            _POLICY["policy"] = spec()
        for name in ("reset", "predict_action_chunk"):
            if not callable(getattr(_POLICY["policy"], name, None)):
                raise TypeError(f"policy: expected an object with a {name}() method, received {_POLICY['policy']!r}")
    return _POLICY["policy"]


def check_chunk(chunk: Any, n_exec: int, where: str) -> np.ndarray:
    """(H, 4) finite actions with H >= n_exec, else PolicyOutputError naming `where` and the shapes."""
    if hasattr(chunk, "detach"):  # a torch tensor
        chunk = chunk.detach().float().cpu().numpy()
    arr = np.asarray(chunk, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != ACTION_DIM or arr.shape[0] < n_exec:
        raise PolicyOutputError(
            f"{where}: policy returned an action chunk of shape {tuple(arr.shape)}; expected shape "
            f"(H, {ACTION_DIM}) with H >= n_action_steps = {n_exec}"
        )
    if not np.isfinite(arr).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(arr))[:, 0]})
        raise PolicyOutputError(
            f"{where}: policy returned non-finite actions (NaN/inf) in chunk rows {bad} of shape "
            f"{tuple(arr.shape)}; expected finite values in [-1, 1]"
        )
    return arr


def policy_cameras(policy: Any) -> tuple[str, ...]:
    """The cameras a checkpoint was trained on (its preprocessor's camera map), else (corner2,)."""
    if isinstance(policy, (str, Path)):
        try:
            from vla.policy import PREPROCESSOR_NAME

            state = json.loads((Path(policy) / PREPROCESSOR_NAME).read_text())
            keys = [k for k in state["camera_map"] if k.startswith(IMAGE_PREFIX)]
            if keys:
                return tuple(k[len(IMAGE_PREFIX):] for k in keys)
        except (ImportError, OSError, KeyError, ValueError):
            pass  # not a full checkpoint (e.g. a LoRA adapter): fall back to the default camera
    return (DEFAULT_CAMERA,)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def eval_episode(job: dict[str, Any]) -> dict[str, Any]:
    """One closed-loop episode (in a worker)."""
    policy = _policy()
    env = get_env(job["task"], job["cameras"], job["image_size"])
    env.set_variation(job["variation"])
    _seed_everything(job["episode_seed"])
    n_exec = job["n_action_steps"] or int(getattr(getattr(policy, "config", None), "n_action_steps", 0) or 0)
    policy.reset()
    obs = env.reset()
    frames = [obs] if job["video"] else None
    queue: list[np.ndarray] = []
    kwargs = _POLICY.get("kwargs", {})
    # With a selector, policies that take it get the last chunk's planned-but-not-executed steps as reference.
    plans = "selector" in kwargs and accepts_keyword(policy.predict_action_chunk, "reference")
    rest = None
    success, steps, chunks, policy_s = False, 0, 0, 0.0
    while steps < job["max_steps"]:
        if not queue:
            where = f"task {job['task']!r}, episode {job['episode']}, step {steps}"
            t0 = time.perf_counter()
            kw = {**kwargs, "reference": rest} if plans and rest is not None else kwargs
            try:
                raw = policy.predict_action_chunk(obs, **kw)
            except Exception as e:  # name the episode; the policy's own message follows
                raise RuntimeError(f"{where}: the policy raised {type(e).__name__}: {e}") from e
            policy_s += time.perf_counter() - t0
            chunk = check_chunk(raw, max(n_exec, 1), where)
            queue = list(chunk[: n_exec or len(chunk)])
            rest = chunk[n_exec:] if 0 < n_exec < len(chunk) else None
            chunks += 1
        obs, success, truncated = env.step(queue.pop(0))
        steps += 1
        if frames is not None:
            frames.append(obs)
        if success or truncated:
            break
    video = None
    if frames is not None:
        from .report import write_mp4

        video = write_mp4(frames, job["cameras"], Path(job["video"]), VIDEO_FPS)
    return {
        "task": job["task"], "episode": job["episode"], "success": bool(success), "length": steps,
        "chunks": chunks, "n_action_steps": n_exec or None, "policy_s": round(policy_s, 3),
        "variation": [job["pool_seed"], job["pool_index"]], "seed": job["episode_seed"],
        "video": str(video) if video else None,
    }


def episode_plan(task: str, seed: int, first_episode: int, episodes: int,
                 split: str = "eval") -> list[tuple[int, int, int, Any, int]]:
    """Episodes ``first_episode ..`` of ``seed``'s evaluation sequence for ``task``: (index, variation pool seed,
    index in pool, variation, episode seed). Every evaluation of a seed runs the same episodes. ``split="train"``
    plays the training variations instead (validation of choices that must not see the held-out ones)."""
    drawn = variations(task, split, first_episode + episodes, seed)[first_episode:]
    tag = [] if split == "eval" else [2]  # the eval split keeps the episode seeds it always had
    return [(i, ps, pi, var, int(np.random.SeedSequence([seed, zlib.crc32(task.encode()), i, *tag]).generate_state(1)[0]))
            for i, (ps, pi, var) in enumerate(drawn, start=first_episode)]


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sound at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, center - half), min(1.0, center + half))


def evaluate(
    policy: str | Path | Callable[[], Any],
    tasks: str | Sequence[str] = "mt10",
    episodes_per_task: int = 10,
    seed: int = 0,
    workers: int = 2,
    max_steps: int = DEFAULT_MAX_STEPS,
    n_action_steps: int | None = None,
    video_dir: Path | str | None = None,
    videos_per_task: int = 1,
    cameras: Sequence[str] | None = None,
    image_size: int = 128,
    device: str = "cpu",
    progress: bool = True,
    num_samples: int = 1,
    selector: str | dict | None = None,
    policy_overrides: Sequence[str] = (),
    first_episode: int = 0,
    split: str = "eval",
) -> dict[str, Any]:
    """Success rate per task over `episodes_per_task` held-out variations.

    Episode i of a run (its variation and its seed) depends only on (task, `seed`, i), so `first_episode=K`
    runs episodes K .. K + n - 1 of the same sequence: `--episodes 10` and then `--first-episode 10 --episodes 20`
    are together exactly one 30-episode run, with no variation twice (another `seed` re-draws from the same
    pools of held-out variations, so two seeds can share variations).

    `cameras` and `image_size` must be those of the policy's training data; `cameras=None` reads them
    from a checkpoint's preprocessor (its camera map), else uses the close-up corner2 camera.
    `policy_overrides`: `--field=value` strings over a checkpoint's config (e.g. `--head.greedy=expected`).
    `split`: "eval" (the held-out variations) or "train" (the training variations: to validate a choice, such as
    where a selector helps, without touching the held-out ones).
    Returns the results dict that report.py renders.
    """
    if split not in ("eval", "train"):
        raise ValueError(f"split: expected 'eval' or 'train', received {split!r}")
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task: expected >= 1, received {episodes_per_task}")
    if max_steps < 1:
        raise ValueError(f"max_steps: expected >= 1, received {max_steps}")
    if isinstance(first_episode, bool) or not isinstance(first_episode, numbers.Integral) or first_episode < 0:
        raise ValueError(f"first_episode: expected an int >= 0, received {first_episode!r}")
    first_episode = int(first_episode)  # numpy ints too
    if n_action_steps is not None and n_action_steps < 1:
        raise ValueError(f"n_action_steps: expected >= 1 or None (the policy's own), received {n_action_steps}")
    if not isinstance(policy, (str, Path)) and not callable(policy):
        raise TypeError(f"policy: expected a checkpoint path or a factory callable, received {policy!r}")
    if policy_overrides and not isinstance(policy, (str, Path)):
        raise ValueError(f"policy_overrides {list(policy_overrides)}: only for a checkpoint path, not {policy!r}")
    if policy_overrides:  # fail here, not in every worker: load the config once with them
        from vla.policy import load_policy_config

        try:
            load_policy_config(policy, policy_overrides)
        except FileNotFoundError as e:
            raise ValueError(f"policy_overrides {list(policy_overrides)}: {e} (a LoRA adapter checkpoint? override "
                             "the base checkpoint instead)") from e
    if not isinstance(num_samples, int) or num_samples < 1 or (num_samples > 1 and selector is None):
        raise ValueError(f"num_samples: expected an int >= 1, and a selector when > 1; received {num_samples!r} "
                         f"with selector {selector!r}")
    predict_kwargs = {} if selector is None else {"num_samples": num_samples, "selector": selector}
    task_list = resolve_tasks(tasks)
    cams = check_cameras(cameras if cameras is not None else policy_cameras(policy))
    videos = Path(video_dir) if video_dir is not None and videos_per_task > 0 else None
    if videos is not None:
        videos.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    jobs = []
    for task in task_list:
        for i, ps, pi, var, ep_seed in episode_plan(task, seed, first_episode, episodes_per_task, split):
            video = (str(videos / f"{task}_ep{i:03d}.mp4")
                     if videos is not None and i - first_episode < videos_per_task else None)
            jobs.append(dict(task=task, episode=i, pool_seed=ps, pool_index=pi, variation=var, cameras=cams,
                             image_size=int(image_size), max_steps=int(max_steps), n_action_steps=n_action_steps,
                             episode_seed=ep_seed, video=video))
    spec = str(policy) if isinstance(policy, Path) else policy
    episodes = []
    with contextlib.closing(run_jobs(eval_episode, jobs, workers, "eval episodes", progress,
                                     _set_policy_spec, (spec, device, predict_kwargs, tuple(policy_overrides)))) as results:
        for ep in results:
            episodes.append(ep)
    per_task: dict[str, Any] = {}
    for task in task_list:
        eps = [e for e in episodes if e["task"] == task]
        k = sum(e["success"] for e in eps)
        per_task[task] = {
            "success_rate": k / len(eps), "successes": k, "episodes": len(eps),
            "ci95": [round(x, 4) for x in wilson_interval(k, len(eps))],
            "episode_lengths": [e["length"] for e in eps], "successful": [e["success"] for e in eps],
            "variations": [e["variation"] for e in eps], "seeds": [e["seed"] for e in eps],
            "policy_s": round(sum(e["policy_s"] for e in eps), 2), "chunks": sum(e["chunks"] for e in eps),
            "videos": [{"path": e["video"], "episode": e["episode"], "success": e["success"]}
                       for e in eps if e["video"]],
        }
    total = sum(t["successes"] for t in per_task.values())
    n = sum(t["episodes"] for t in per_task.values())
    return {
        "benchmark": "metaworld",
        "policy": str(spec) if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec)),
        "tasks": per_task,
        "mean_success": float(np.mean([t["success_rate"] for t in per_task.values()])),
        "ci95": [round(x, 4) for x in wilson_interval(total, n)],
        "interval_method": "Wilson score, 95%, over episodes (per task and pooled for the mean)",
        "episodes_per_task": episodes_per_task, "seed": seed, "first_episode": first_episode, "split": split,
        "workers": workers, "max_steps": max_steps,
        "n_action_steps": n_action_steps, "num_samples": num_samples, "selector": selector,
        "policy_overrides": list(policy_overrides),
        "n_action_steps_used": sorted({e["n_action_steps"] or 0 for e in episodes}),  # 0: whole chunks
        "cameras": list(cams), "image_size": int(image_size),
        "variation_pools": "eval: metaworld.MT1(task, seed=k).train_tasks for odd k; training uses even k",
        "video_fps": VIDEO_FPS, "wall_time_s": round(time.perf_counter() - start, 2),
        "command": command_line(),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla eval metaworld", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="checkpoint directory, or 'expert' for the scripted experts")
    p.add_argument("--tasks", default="mt10", help="mt10, mt50, or comma-separated names")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task")
    p.add_argument("--out", type=Path, default=Path("outputs/eval_metaworld"), help="report directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-episode", type=int, default=0,
                   help="run episodes K.. of the seed's sequence (more episodes later, none repeated)")
    p.add_argument("--split", default="eval", choices=["eval", "train"],
                   help="held-out variations (default) or the training ones (to validate choices without the held-out)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS)
    p.add_argument("--n-action-steps", type=int, default=None, help="default: the policy's config")
    p.add_argument("--videos-per-task", type=int, default=1)
    p.add_argument("--cameras", default=None, help="comma-separated, as in the training data "
                   "(default: from the checkpoint, else corner2)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--selector", "--selector.type", dest="selector", default=None,
                   help="test-time chunk selector: first, consistency, coherence, cfn, world_model, value, dagger, gated "
                        "(docs/selectors.md); --selector.FIELD=VALUE sets a field of its config, e.g. "
                        "--selector.mixture_score=likelihood")
    p.add_argument("--selector.path", dest="selector_path", default=None,
                   help="selector assets (cfn, value, dagger: default the one saved with the policy; world_model: required)")
    p.add_argument("--num-samples", type=int, default=1, help="candidate chunks per re-plan (needs --selector)")
    p.add_argument("--no-progress", action="store_true")
    p.epilog = ("Any --policy.FIELD=VALUE overrides the checkpoint's config for this evaluation (execution "
                "settings: --policy.head.temperature=0, --policy.head.greedy=expected, --policy.head.num_steps=5, "
                "--policy.inference_bf16=true).")
    return p


_SELECTOR_FIELD = re.compile(r"--selector\.(\w+)=(.*)")


def pop_selector_fields(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Take ``--selector.FIELD=VALUE`` (any field of the selector's config but type and path, which are options)
    out of ``argv`` -> (the rest, {FIELD: VALUE}); a VALUE that reads as JSON (a number, true, a list) is parsed."""
    rest, fields = [], {}
    for a in argv:
        m = _SELECTOR_FIELD.fullmatch(a)
        if m is None or m.group(1) in ("type", "path"):
            rest.append(a)
            continue
        try:
            fields[m.group(1)] = json.loads(m.group(2))
        except ValueError:
            fields[m.group(1)] = m.group(2)
    return rest, fields


def selector_spec(args: argparse.Namespace, fields: dict[str, Any] | None = None) -> str | dict | None:
    """-> None, a selector name, or a config map {"type", "path"?, FIELD: VALUE...} whose fields the config has."""
    import dataclasses

    from policies.selectors.base import selector_config_class

    fields = dict(fields or {})
    if args.selector is None:
        given = (["--selector.path"] if args.selector_path is not None else []) + [f"--selector.{k}" for k in fields]
        if given:
            raise SystemExit(f"{', '.join(given)} needs --selector NAME")
        return None
    if args.selector_path is not None:
        fields["path"] = args.selector_path
    if not fields:
        return args.selector
    cls = selector_config_class(args.selector)  # an unknown name lists the known ones
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise SystemExit(f"--selector.{unknown[0]}: selector {args.selector!r} has no such field (its fields: "
                         f"{', '.join(known) or 'none'})")
    return {"type": args.selector, **fields}  # values are checked where the selector is built


def main(argv: Sequence[str] | None = None) -> int:
    from .report import git_commit, write_report

    from vla.config import parse_args_with_overrides

    parser = build_parser()
    argv, selector_fields = pop_selector_fields(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args_with_overrides(parser, argv)
    selector = selector_spec(args, selector_fields)
    if args.policy == "expert":
        from .expert_policy import ScriptedExpertPolicy

        if overrides:
            given = " ".join("--policy." + o[2:] for o in overrides)  # as typed: --policy.FIELD=VALUE
            parser.error(f"{given}: the scripted experts have no config to override")

        policy: Any = ScriptedExpertPolicy
    else:
        policy = args.policy
    commit = git_commit()  # the code the workers load now, not whatever is checked out when they finish
    results = evaluate(policy, args.tasks, args.episodes, args.seed, args.workers, args.max_steps,
                       args.n_action_steps, args.out / "videos", args.videos_per_task,
                       tuple(c for c in args.cameras.split(",") if c) if args.cameras else None,
                       args.image_size, args.device,
                       not args.no_progress, args.num_samples, selector, overrides,
                       args.first_episode, args.split)
    results["commit"] = commit
    paths = write_report(results, args.out)
    width = max(len(t) for t in results["tasks"])
    for task, r in results["tasks"].items():
        print(f"  {task:<{width}}  {r['success_rate']:6.1%}  ({r['successes']}/{r['episodes']})")
    lo, hi = results["ci95"]
    print(f"mean success {results['mean_success']:.1%} (95% CI {lo:.1%}-{hi:.1%}), {results['wall_time_s']:.0f} s")
    print(f"report: {paths['html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
