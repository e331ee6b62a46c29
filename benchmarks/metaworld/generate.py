"""Scripted MetaWorld demonstrations -> a LeRobot v3 dataset (written with lerobot's own API).

    vla data metaworld --tasks mt10 --episodes 50 --out data/mt10 [--image-size 128] [--second-camera]

Every episode runs MetaWorld's scripted expert for its task on one training variation (tasks.py:
even-seeded variation pools, never used by evaluation). Worker processes simulate and render whole
episodes and return arrays; the parent writes them in job order (task by task, episode by episode),
so the dataset is identical for a seed whatever the number of workers. Only successful episodes are
kept; each stops `steps_after_success` steps after the first success so it ends in the goal state.

fps is 80: MetaWorld steps the controller every 5 physics steps of 2.5 ms (12.5 ms per action), so
frame timestamps are real time. Action chunks of H steps cover H / 80 s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .env import ACTION_DIM, DEFAULT_CAMERA, DEFAULT_SECOND_CAMERA, ENV_STATE_DIM, STATE_DIM, check_cameras
from .report import command_line
from .tasks import INSTRUCTIONS, resolve_tasks, variations
from .workers import get_env, run_jobs

FPS = 80
DEFAULT_MAX_STEPS = 500  # MetaWorld's own episode limit; experts succeed in ~50-150 steps


def features(cameras: Sequence[str], image_size: int, use_videos: bool) -> dict[str, dict]:
    """LeRobot feature spec of the generated datasets."""
    feats: dict[str, dict] = {
        f"observation.images.{cam}": {
            "dtype": "video" if use_videos else "image",
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channels"],
        }
        for cam in cameras
    }
    feats["observation.state"] = {"dtype": "float32", "shape": (STATE_DIM,), "names": ["x", "y", "z", "gripper"]}
    feats["observation.environment_state"] = {
        "dtype": "float32",
        "shape": (ENV_STATE_DIM,),
        "names": [f"s{i}" for i in range(ENV_STATE_DIM)],
    }
    feats["action"] = {"dtype": "float32", "shape": (ACTION_DIM,), "names": ["dx", "dy", "dz", "grip"]}
    return feats


def expert_episode(job: dict[str, Any]) -> dict[str, Any]:
    """Run the scripted expert on one variation (in a worker). Returns the episode as arrays:
    images {cam: (T, S, S, 3) uint8}, state (T, 4), environment_state (T, 39), action (T, 4)."""
    from metaworld.policies import ENV_POLICY_MAP

    env = get_env(job["task"], job["cameras"], job["image_size"])
    env.set_variation(job["variation"])
    expert = ENV_POLICY_MAP[job["task"]]()
    obs = env.reset()
    steps: list[dict[str, Any]] = []
    success_step = None
    for t in range(min(job["max_steps"], env.max_path_length)):
        # The expert reads the same float32 state a policy gets, so its evaluation (expert_policy.py)
        # and its demonstrations act identically.
        action = np.clip(expert.get_action(obs["observation.environment_state"]), -1.0, 1.0).astype(np.float32)
        steps.append({**obs, "action": action})
        obs, success, truncated = env.step(action)
        if success and success_step is None:
            success_step = t
        if truncated or (success_step is not None and t >= success_step + job["steps_after_success"]):
            break
    return {
        "task": job["task"],
        "episode": job["episode"],
        "variation": [job["pool_seed"], job["pool_index"]],
        "success": success_step is not None,
        "success_step": success_step,
        "length": len(steps),
        "images": {c: np.stack([s[f"observation.images.{c}"] for s in steps]) for c in job["cameras"]},
        "state": np.stack([s["observation.state"] for s in steps]),
        "environment_state": np.stack([s["observation.environment_state"] for s in steps]),
        "action": np.stack([s["action"] for s in steps]),
    }


def generate_dataset(
    out: Path | str,
    tasks: str | Sequence[str] = "mt10",
    episodes_per_task: int = 50,
    image_size: int = 128,
    cameras: Sequence[str] = (DEFAULT_CAMERA,),
    seed: int = 0,
    workers: int = 2,
    max_steps: int = DEFAULT_MAX_STEPS,
    steps_after_success: int = 10,
    use_videos: bool = True,
    repo_id: str = "local/metaworld",
    progress: bool = True,
) -> dict[str, Any]:
    """Write a LeRobot dataset of successful expert episodes at `out` (must not exist yet).

    Returns a summary: per-task expert success, episodes kept, frames, wall time, size on disk. The
    same summary and the variation of every kept episode go to `out/meta/metaworld_generation.json`.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    os.environ.setdefault("SVT_LOG", "1")  # the AV1 encoder logs its whole config per episode otherwise
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"out: {out} already exists; choose a new directory (nothing is overwritten)")
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task: expected >= 1, received {episodes_per_task}")
    if max_steps < 1 or steps_after_success < 0:
        raise ValueError(f"max_steps >= 1 and steps_after_success >= 0 expected, got {max_steps}, {steps_after_success}")
    task_list, cams = resolve_tasks(tasks), check_cameras(cameras)
    start = time.perf_counter()
    jobs = [
        dict(task=task, episode=i, pool_seed=ps, pool_index=pi, variation=var, cameras=cams,
             image_size=int(image_size), max_steps=int(max_steps), steps_after_success=int(steps_after_success))
        for task in task_list
        for i, (ps, pi, var) in enumerate(variations(task, "train", episodes_per_task, seed))
    ]
    import av
    import datasets

    bars_were_on, av_level = datasets.is_progress_bar_enabled(), av.logging.get_level()
    datasets.disable_progress_bars()  # lerobot runs a datasets.map per saved episode: one bar each
    av.logging.set_level(av.logging.ERROR)  # libav prints a line per encoded episode otherwise
    # Streaming encoding feeds frames straight to the AV1 encoder (no PNG round trip): ~25% less
    # parent CPU, which the simulator workers need; one encoder thread for the same reason.
    ds = LeRobotDataset.create(repo_id=repo_id, root=out, fps=FPS, robot_type="sawyer",
                               features=features(cams, int(image_size), use_videos), use_videos=use_videos,
                               streaming_encoding=use_videos, encoder_threads=1)
    attempts = {t: 0 for t in task_list}
    kept: dict[str, list[dict]] = {t: [] for t in task_list}
    frames = 0
    try:
        with contextlib.closing(run_jobs(expert_episode, jobs, workers, "expert episodes", progress)) as results:
            for ep in results:
                attempts[ep["task"]] += 1
                if not ep["success"]:
                    continue
                for t in range(ep["length"]):
                    frame = {f"observation.images.{c}": ep["images"][c][t] for c in cams}
                    frame["observation.state"] = ep["state"][t]
                    frame["observation.environment_state"] = ep["environment_state"][t]
                    frame["action"] = ep["action"][t]
                    frame["task"] = INSTRUCTIONS[ep["task"]]
                    ds.add_frame(frame)
                ds.save_episode()
                frames += ep["length"]
                kept[ep["task"]].append({k: ep[k] for k in ("episode", "variation", "success_step", "length")})
        if frames == 0:
            raise RuntimeError(f"no expert episode succeeded within max_steps={max_steps}: nothing to write")
        ds.finalize()
    except BaseException as e:
        e.add_note(f"the dataset at {out} is incomplete: delete it before running again")
        raise
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        av.logging.set_level(av_level)
    wall = time.perf_counter() - start
    summary = {
        "root": str(out),
        "command": command_line(),
        "tasks": task_list,
        "episodes_per_task": episodes_per_task,
        "seed": seed,
        "workers": workers,
        "cameras": list(cams),
        "image_size": int(image_size),
        "use_videos": use_videos,
        "fps": FPS,
        "max_steps": max_steps,
        "steps_after_success": steps_after_success,
        "expert_success": {t: len(kept[t]) / attempts[t] for t in task_list},
        "episodes_attempted": sum(attempts.values()),
        "episodes_kept": sum(len(v) for v in kept.values()),
        "frames": frames,
        "wall_time_s": round(wall, 2),
        "episodes_per_min": round(60 * sum(attempts.values()) / wall, 2),
        "size_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "variation_pools": "train: metaworld.MT1(task, seed=k).train_tasks for even k (see benchmarks/metaworld/tasks.py)",
    }
    (out / "meta" / "metaworld_generation.json").write_text(json.dumps({**summary, "episodes": kept}, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla data metaworld", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="mt10", help="mt10, mt50, or comma-separated names (reach,push-v3)")
    p.add_argument("--episodes", type=int, default=50, help="expert episodes attempted per task")
    p.add_argument("--out", required=True, type=Path, help="dataset directory (must not exist)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--camera", default=DEFAULT_CAMERA, help="main camera (default: close-up corner2)")
    p.add_argument("--second-camera", nargs="?", const=DEFAULT_SECOND_CAMERA, default=None, metavar="NAME",
                   help=f"add a second camera (default name when given alone: {DEFAULT_SECOND_CAMERA})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS)
    p.add_argument("--steps-after-success", type=int, default=10)
    p.add_argument("--images", action="store_true", help="store PNG frames instead of AV1 videos")
    p.add_argument("--repo-id", default="local/metaworld")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cameras = (args.camera,) + ((args.second_camera,) if args.second_camera else ())
    s = generate_dataset(args.out, args.tasks, args.episodes, args.image_size, cameras, args.seed, args.workers,
                         args.max_steps, args.steps_after_success, not args.images, args.repo_id,
                         not args.no_progress)
    width = max(len(t) for t in s["tasks"])
    print("expert success per task:")
    for task, rate in s["expert_success"].items():
        print(f"  {task:<{width}}  {rate:6.1%}")
    print(f"kept {s['episodes_kept']}/{s['episodes_attempted']} episodes, {s['frames']} frames, "
          f"{s['size_bytes'] / 2**20:.1f} MiB, {s['wall_time_s']:.0f} s ({s['episodes_per_min']:.1f} episodes/min)")
    print(f"dataset: {s['root']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
